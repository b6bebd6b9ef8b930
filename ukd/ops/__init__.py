"""Operations a network can be built with in place of XLA's own, chosen in `config.model`."""
