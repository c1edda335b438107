"""placeholder until the tool lands."""

def add_parser(subparsers):
    return subparsers.add_parser("profile", help="(not available yet)")


def run(args):
    from ..errors import LmoptError
    raise LmoptError("not available yet")
