"""The flags of a bench script from its Args dataclass: one --flag per field, its help from the
field's metadata, its choices from `choices`, booleans as --flag / --no-flag."""

import argparse
import dataclasses


def parser_for(args_class, description, choices=None):
    """argparse.ArgumentParser with one flag per field of args_class (defaults shown in --help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=(choices or {}).get(f.name),
                                help=f.metadata["help"])
    return parser
