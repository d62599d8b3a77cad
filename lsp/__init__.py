"""The language server (`lacuna serve`) and the `lacuna` command line."""
