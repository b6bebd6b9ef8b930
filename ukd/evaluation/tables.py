"""The Markdown tables of the reports (an evaluation's table, the study's tables).

One layout and one way of writing a 'mean ± std' cell, so an evaluation's table and the
study's read alike: a number means the same thing in both, and so does 'n/a'.
"""

from collections.abc import Mapping, Sequence


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table, each column padded to its widest cell so it also reads as plain text.

  Args:
    header: the column titles.
    rows: the cells of each row, as many as `header` has.

  Returns:
    The table's lines joined by newlines, without a final newline.
  """
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

  def line(cells):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), rule, *(line(row) for row in rows)])


def mean_std(stats: Mapping[str, float], scale: float, digits: int) -> str:
  """'mean ± std' of a `ukd.evaluation.metrics.summarize` result, e.g. '81.3 ± 4.2'.

  Values without a number (NaN: a distance with exactly one mask empty, or a seed with no
  defined value at all) are left out of mean and std and counted after it, '(2 n/a)', so a
  gap is never hidden; with no number at all the cell is 'n/a'.

  Args:
    stats: {'mean', 'std', 'n', 'n_empty'} as `ukd.evaluation.metrics.summarize` returns it.
    scale: factor for mean and std, e.g. 100 for Dice in percent.
    digits: digits after the decimal point.

  Returns:
    The cell's text.
  """
  if stats["n"] == 0:
    text = "n/a"
  else:
    text = f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"
  if stats["n_empty"]:
    text += f" ({stats['n_empty']} n/a)"
  return text
