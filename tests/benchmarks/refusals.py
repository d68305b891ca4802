"""A benchmark script's refusal as the tests check it: exit status 2, no traceback, the message on one line."""
from __future__ import annotations


def refused(main, argv, capsys) -> str:
    """``main(argv)`` must stop with exit status 2 (argparse's or the benchmark's own) and no traceback; its stderr,
    its whitespace folded to single spaces."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return " ".join(err.split())
