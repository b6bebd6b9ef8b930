"""Config files: `get_config(arg)` returns an ml_collections ConfigDict."""
