"""hello: the trivial function (measures pure platform overhead)."""
NAME = "hello"


def run():
    return ", ".join(["hello", "world"])
