"""``--address`` help: every accepted form, ``local`` included (an error message suggests ``--address local``)."""
from __future__ import annotations

import argparse

import pytest

from orchestrator.cli import build_parser
from orchestrator.commands import address_help


def _address_helps() -> dict[str, str]:
    """{command: help of its --address} for every command that takes --address."""
    found = {}
    for action in build_parser()._subparsers._group_actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in sub._actions:
                    if "--address" in a.option_strings:
                        found[name] = a.help
    return found


def test_the_shared_address_help_names_every_accepted_form():
    text = address_help("start a local one")
    for form in ("HOST:PORT", "'auto'", "$RAY_ADDRESS", "gmpq cluster up", "ray start --head", "ray://HOST:10001",
                 "'local'"):
        assert form in text, form
    assert text.endswith("(default: start a local one)")


def test_the_commands_that_join_a_cluster_are_the_ones_checked():
    assert {"sweep", "run", "finetune", "study"} <= set(_address_helps())


@pytest.mark.parametrize("command", ["sweep", "run", "finetune", "study"])
def test_every_address_help_says_local_is_accepted(command):
    assert "'local'" in _address_helps()[command]
