"""The bit policy a fine-tune checkpoint records (``policy_layers``, ``policy_source``) and how another policy differs
from it: the one wording of every refusal to resume another policy's fine-tune (``finetune.check_resume_state``,
and ``gmpq finetune``'s own refusal, which adds the command's flags). Standard library only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .policy import BitPolicy

__all__ = ["policy_layers", "recorded_policy_source", "policy_difference"]


def policy_layers(policy: BitPolicy) -> dict[str, list[int]]:
    """The bits of ``policy`` as a fine-tune checkpoint records them (its ``policy_layers``): {layer: [w, a]}."""
    return {n: [s.w_bits, s.a_bits] for n, s in policy.layers.items()}


def recorded_policy_source(ckpt: Mapping[str, Any]) -> str | None:
    """Where the policy of a fine-tune checkpoint came from (its file, or "uniform W4A4"); None if not recorded."""
    source = ckpt.get("policy_source")
    return source if isinstance(source, str) and source else None


def policy_difference(old: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """How a checkpoint's recorded ``policy_layers`` (``old``) and this run's (``now``) differ, in the words of every
    refusal of another policy's checkpoint (``check_resume_state``; gmpq finetune's own, which adds its flags): the
    layers with other bits (two named), the layers only one of them quantizes."""
    differ = [n for n in old if n in now and list(old[n]) != list(now[n])]
    only = sorted(set(old) ^ set(now))
    shown = "; ".join(f"{n}: W{old[n][0]}A{old[n][1]} there, W{now[n][0]}A{now[n][1]} now" for n in differ[:2])
    more = f"; {len(differ) - 2} more" if len(differ) > 2 else ""
    how = f"{len(differ)} layer(s) have other bits ({shown}{more})" if differ else ""
    if only:
        how += ("; " if how else "") + f"{len(only)} layer(s) are in only one of them (e.g. {only[0]})"
    return how
