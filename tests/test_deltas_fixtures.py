"""AdapterHub and OpenDelta parity from the reference fixtures (tests/fixtures/README.md).

All cases of one base architecture go into ONE padded batch, each fixture's 3 x 11 sequences on their
own slot, next to 3 base-only rows: every row must equal the logits the producing library computed
(fp32, atol 1e-5, the fixture README's figure). This checks the placements that differ between the
libraries (Pfeiffer h+f, Houlsby f, parallel h x 4.0, OpenDelta on the module output, AdapterHub IA3
output scaling, absolute-vs-delta BitFit) while every other kind runs in the same forward.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from delta_store.base_spec import BaseSpec
from delta_store.errors import UnsupportedDelta
from server.deltas import wrap_model
from tests.helpers import FIXTURES, assert_close, fixture_cases, import_delta

ATOL = 1e-5
# case folder name -> regex of the reason it is refused (at import or by the wrapped model); none today.
REFUSED: dict[str, str] = {}


def _cases(arch: str) -> list:
    # prompt/prefix cases need the KV prefix the engine adds: tests/test_formats_prompt_fixtures.py (oracle)
    cases = fixture_cases(arch, prompt=False)
    assert cases, f"no fixture cases for {arch} under {FIXTURES}"
    return cases


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_fixture_cases_in_one_packed_batch(arch):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base" / arch, dtype=torch.float32).eval()
    spec = BaseSpec.from_model(base)
    dm = wrap_model(base, max_slots=32, max_rank=16, max_bottleneck=64)
    ids, expected, slots, names = [], [], [], []
    for slot, case in enumerate(_cases(arch)):
        exp = load_file(case / "expected.safetensors")
        if case.name in REFUSED:
            with pytest.raises(UnsupportedDelta, match=REFUSED[case.name]):
                dm.set_delta(slot, import_delta(case, spec))
            continue
        dm.set_delta(slot, import_delta(case, spec))
        ids.append(exp["input_ids"])
        expected.append(exp["logits"])
        slots += [slot] * 3
        names += [f"{case.parent.name}/{case.name}"] * 3
        if slot == 0:  # the same sequences on the bare base, in the same batch
            ids.append(exp["input_ids"])
            expected.append(exp["base_logits"])
            slots += [-1] * 3
            names += ["base"] * 3
    ids, expected = torch.cat(ids), torch.cat(expected)  # [rows, 11], [rows, 11, 256]
    dm.batch.prepare_sequences(slots, [ids.shape[1]] * len(slots))
    with torch.no_grad():
        got = dm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for row, name in enumerate(names):
        assert_close(got[row], expected[row], atol=ATOL, what=f"{arch} row {row} ({name})")
