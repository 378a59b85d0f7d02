"""plan: the --vram-budget planner's decisions from given peak tables, and its estimates against bench/RESULTS.md."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from stages.errors import UserError
from stages.device import cap_gpu_memory
from stages.plan import (GIB, LINEAR_WEIGHT_PARAMS, OTHER_PARAMS, Candidate, Choices, apply_plan, choices_for,
                         estimate, load_table, needed_gib, plan)


def row(ckpt, weights, b, peak, img_s, optimizer="adamw", compile="none", resolution=512, ga=None):
    """One `bench` JSON row (the keys the planner reads)."""
    return {"resolution": resolution, "micro_batch": b, "grad_accum": ga or 4 // b, "checkpointing": ckpt,
            "base_weights": weights, "optimizer": optimizer, "compile": compile,
            "peak_allocated_gib": peak, "images_per_s": img_s}


# Every candidate of BF16_NF4 at 512², effective batch 4. Marked rows are H200 measurements from
# bench/RESULTS.md (nf4 ckpt b1: from issue #5); the others are plausible values to test decisions on.
TABLE = [
    row(False, "bf16", 4, 12.717, 9.78),  # measured
    row(False, "bf16", 2, 9.0, 5.0),
    row(False, "bf16", 1, 7.2, 2.5),
    row(True, "bf16", 4, 5.9, 4.5),
    row(True, "bf16", 2, 5.6, 2.3),
    row(True, "bf16", 1, 5.487, 1.339),  # measured (regional compile, fused AdamW)
    row(False, "nf4", 4, 9.6, 5.5),
    row(False, "nf4", 2, 5.9, 2.9),
    row(False, "nf4", 1, 4.1, 1.45),
    row(True, "nf4", 4, 2.8, 2.6),
    row(True, "nf4", 2, 2.5, 1.3),
    row(True, "nf4", 1, 2.21, 0.63),  # measured
]
BF16_NF4 = Choices(base_weights=("bf16", "nf4"), optimizer=("adamw",), compile=("none",))


@pytest.mark.parametrize("budget_gib, expected", [
    (40, ("bf16", False, 4)),  # everything fits: the fastest row
    (14, ("nf4", False, 4)),   # bf16 no-ckpt b4 needs 12.717 × 1.08 + 0.5 = 14.23 GiB
    (8, ("bf16", True, 4)),    # 6.87 GiB with margin; checkpointing b4 beats nf4 no-ckpt b2 (4.5 vs 2.9 img/s)
    (6, ("nf4", True, 4)),     # bf16 ckpt b1 needs 6.43 GiB; nf4 ckpt b4 is the fastest of what is left
    (3, ("nf4", True, 1)),     # 2.21 GiB -> 2.89 with margin; nf4 ckpt b2 needs 3.2
])
def test_planner_picks_the_fastest_row_that_fits(budget_gib, expected):
    p = plan(budget_gib * GIB, 512, 4, TABLE, BF16_NF4)
    assert (p.choice.base_weights, p.choice.gradient_checkpointing, p.choice.batch_size) == expected
    assert p.estimate.source == "measured" and p.needed_gib <= budget_gib
    assert p.choice.batch_size * p.choice.grad_accum == 4


def test_reason_names_the_choice_and_the_faster_configurations_rejected_for_memory():
    reason = plan(8 * GIB, 512, 4, TABLE, BF16_NF4).reason
    first, *rejected = reason.splitlines()
    assert "chose bf16 weights, checkpointing" in first and "micro-batch 4 × grad-accum 1" in first
    assert "~4.50 img/s" in first and "peak ~5.90 GiB" in first and "measured" in first
    # the fastest of all (needs 14.2 GiB) and the nearest misses, each with what it needs
    assert "rejected bf16 weights, no checkpointing" in rejected[0] and "needs ~14.2 GiB" in rejected[0]
    assert "needs ~10.2 GiB" in rejected[1]  # bf16 no-ckpt b2: 9.0 × 1.08 + 0.5
    assert len(rejected) == 3  # nf4 no-ckpt b4 is the third faster one; slower rows are not listed
    assert plan(40 * GIB, 512, 4, TABLE, BF16_NF4).reason.count("\n") == 0  # nothing faster was rejected
    # with CUDA graphs (train's default on CUDA) the unstreamed choices say so; a streamed one runs eagerly
    graphs = Choices(base_weights=("bf16",), optimizer=("adamw",), compile=("none",), cuda_graphs=True, stream_blocks=(0, 2))
    assert ", CUDA graphs, micro-batch" in plan(8 * GIB, 512, 4, allowed=graphs).reason.splitlines()[0]
    assert "2 blocks streamed, checkpointing, adamw, eager" in plan(2 * GIB, 512, 4, allowed=graphs).reason


def test_no_fit_is_one_line_naming_the_budget_and_the_smallest_peak():
    with pytest.raises(UserError) as e:
        plan(1 * GIB, 512, 4, TABLE, BF16_NF4)
    message = str(e.value)
    assert "\n" not in message and "1.00 GiB" in message
    assert "~2.21 GiB" in message and "nf4 weights, checkpointing" in message and "micro-batch 1" in message


@pytest.mark.parametrize("effective_batch", [1, 4, 6, 16])
@pytest.mark.parametrize("budget_gib", [4, 12, 80])
def test_effective_batch_is_preserved(effective_batch, budget_gib):
    c = plan(budget_gib * GIB, 1024, effective_batch).choice
    assert c.batch_size * c.grad_accum == effective_batch


def test_large_budget_takes_a_large_micro_batch_without_checkpointing():
    # the measured b16 peak at 512² is 34.9 GiB: 38.2 GiB with margin
    c = plan(40 * GIB, 512, 16, [row(False, "bf16", 16, 34.9, 40.0, ga=1)], Choices(compile=("none",))).choice
    assert (c.gradient_checkpointing, c.batch_size, c.grad_accum, c.base_weights) == (False, 16, 1, "bf16")


def test_measured_rows_override_estimates():
    c = Candidate(False, "bf16", "adamw", "none", 4, 1)
    guessed = estimate(c, 512)
    assert not guessed.peak_measured and guessed.source == "estimated"
    measured = estimate(c, 512, [row(False, "bf16", 4, 15.0, 7.0), row(False, "bf16", 4, 15.5, 7.0)])
    assert measured.peak_gib == 15.5 and measured.images_per_s == pytest.approx(7.0) and measured.source == "measured"
    assert estimate(c, 1024, [row(False, "bf16", 4, 15.0, 7.0)]) == estimate(c, 1024)  # another resolution: no match
    # and the decision follows: 16 GiB fits the estimate (12.7 GiB) but not the measured 15.5 GiB
    allowed = Choices(base_weights=("bf16",), optimizer=("adamw",), compile=("none",))
    assert plan(16 * GIB, 512, 4, allowed=allowed).choice == c
    assert plan(16 * GIB, 512, 4, [row(False, "bf16", 4, 15.5, 7.0)], allowed).choice != c


def test_a_measured_speed_is_re_timed_for_another_grad_accum():
    # b1 × ga4 at 1.116 img/s with 8-bit AdamW (0.09 s per optimizer step): 0.8736 s per micro-batch
    c = Candidate(True, "bf16", "adamw8bit", "none", 1, 8)
    e = estimate(c, 512, [row(True, "bf16", 1, 5.361, 1.116, optimizer="adamw8bit", ga=4)])
    assert e.speed_measured and e.images_per_s == pytest.approx(8 / (8 * (4 / 1.116 - 0.09) / 4 + 0.09))


# bench/RESULTS.md (H200) and issue #5: (candidate, resolution, peak allocated GiB, img/s or None)
FACTS = [
    (Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 512, 5.361, None),
    (Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 1024, 5.837, None),
    (Candidate(True, "fp16", "adamw8bit", "none", 1, 4), 512, 5.357, None),
    (Candidate(True, "bf16", "adamw", "regional", 1, 4), 512, 5.487, 1.339),
    (Candidate(False, "bf16", "adamw", "regional", 4, 1), 512, 12.727, 11.341),
    (Candidate(False, "bf16", "adamw", "none", 4, 1), 512, 12.717, 9.780),
    (Candidate(False, "bf16", "adamw", "none", 16, 1), 512, 34.9, None),
    (Candidate(False, "bf16", "adamw", "regional", 8, 1), 1024, 48.9, None),
    (Candidate(True, "nf4", "adamw8bit", "none", 1, 4), 512, 2.21, 0.63),
    (Candidate(True, "nf4", "adamw8bit", "none", 1, 4), 1024, 2.86, 0.75),
]


@pytest.mark.parametrize("c, resolution, peak, img_s", FACTS)
def test_estimates_reproduce_the_measurements_within_10_percent(c, resolution, peak, img_s):
    e = estimate(c, resolution)
    assert e.peak_gib == pytest.approx(peak, rel=0.10)
    if img_s:
        assert e.images_per_s == pytest.approx(img_s, rel=0.10)


def test_eager_checkpointing_speed_is_the_mean_of_its_runs_within_10_percent():
    # the same host-bound configuration (bf16/fp16, ckpt, 8-bit AdamW, b1 × ga4) ran at 0.95-1.36 img/s
    runs = [0.951, 1.058, 1.116, 1.255, 1.363]
    e = estimate(Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 512)
    assert e.images_per_s == pytest.approx(sum(runs) / len(runs), rel=0.10)


def test_parameter_counts_match_the_sdxl_unet(sdxl_meta_unet):
    import torch
    unet = sdxl_meta_unet()
    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
    assert linear == LINEAR_WEIGHT_PARAMS
    assert sum(p.numel() for p in unet.parameters()) == LINEAR_WEIGHT_PARAMS + OTHER_PARAMS
    # 2,567,463,684 parameters in bf16: the 4.78 GiB of RESULTS.md
    assert 2 * (LINEAR_WEIGHT_PARAMS + OTHER_PARAMS) / GIB == pytest.approx(4.78, abs=0.01)


def test_near_ties_take_less_memory_and_short_runs_skip_compile():
    fast_big, fast_small = row(False, "bf16", 4, 12.0, 10.0), row(False, "bf16", 2, 8.0, 9.9)
    allowed = Choices(base_weights=("bf16",), optimizer=("adamw",), compile=("none",), gradient_checkpointing=(False,))
    assert plan(40 * GIB, 512, 4, [fast_big, fast_small], allowed).choice.batch_size == 2  # 1% slower, 4 GiB less
    allowed = Choices(base_weights=("bf16",), optimizer=("adamw",))
    assert plan(40 * GIB, 512, 4, allowed=allowed, max_steps=1000).choice.compile == "regional"
    assert plan(40 * GIB, 512, 4, allowed=allowed, max_steps=10).choice.compile == "none"  # 30 s start > 10 steps' gain


def test_load_table_reads_the_json_lines_of_bench_output(tmp_path):
    rows = [row(True, "bf16", 1, 5.361, 1.116, optimizer="adamw8bit") | {"config": {"steps": 10}}]
    out = tmp_path / "bench.txt"
    out.write_text("recipe                cached inputs, UNet only\n" + json.dumps(rows[0]) + "\nnot json\n")
    assert load_table(out) == rows
    assert estimate(Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 512, load_table(out)).peak_gib == 5.361


@dataclass
class FullConfig:
    gradient_checkpointing: bool = True
    base_weights: str = "bf16"
    optimizer: str = "adamw8bit"
    compile: str = "none"
    batch_size: int = 1
    grad_accum: int = 4
    learning_rate: float = 5e-5


@dataclass
class OlderConfig:  # no base_weights or compile fields
    gradient_checkpointing: bool = True
    optimizer: str = "adamw8bit"
    batch_size: int = 1
    grad_accum: int = 4


def test_apply_plan_sets_the_fields_the_config_has():
    nf4 = plan(6 * GIB, 512, 4, TABLE, BF16_NF4)
    cfg = apply_plan(FullConfig(learning_rate=1e-4), nf4)
    assert cfg == FullConfig(gradient_checkpointing=True, base_weights="nf4", optimizer="adamw", compile="none",
                             batch_size=4, grad_accum=1, learning_rate=1e-4)
    bf16 = plan(40 * GIB, 512, 4, TABLE, BF16_NF4)
    assert apply_plan(OlderConfig(), bf16) == OlderConfig(False, "adamw", 4, 1)
    with pytest.raises(ValueError, match="base_weights=nf4"):  # it would silently train something else
        apply_plan(OlderConfig(), nf4)


def test_choices_for_follows_the_config_fields_and_what_is_available():
    assert choices_for(FullConfig(), "bf16", bitsandbytes=True) == Choices()
    assert "int8" not in Choices().base_weights  # never planned: bitsandbytes keeps its inputs past checkpointing
    assert plan(40 * GIB, 512, 4, allowed=Choices(base_weights=("int8",))).choice.base_weights == "int8"  # it fits
    assert choices_for(FullConfig(), "fp16", bitsandbytes=False) == Choices(
        base_weights=("fp16", "fp8"), optimizer=("adamw",))
    assert choices_for(OlderConfig(), "bf16", bitsandbytes=True) == Choices(base_weights=("bf16",), compile=("none",))
    c = plan(5 * GIB, 512, 4, allowed=choices_for(FullConfig(), "bf16", bitsandbytes=False)).choice
    assert c.base_weights == "fp8" and c.optimizer == "adamw"  # no nf4 / 8-bit AdamW without bitsandbytes
    apply_plan(OlderConfig(), plan(7 * GIB, 512, 4, allowed=choices_for(OlderConfig(), "bf16", True)))  # no ValueError


def test_cap_gpu_memory_needs_cuda():
    import torch
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        cap_gpu_memory(torch.device("cpu"), "8GiB", print)


def test_needed_includes_the_safety_margin():
    assert needed_gib(10.0) == pytest.approx(10.0 * 1.08 + 0.5)


def test_train_cli_budget_and_compile_need_cuda(fp32_cache, tmp_path, cli):
    for flags, message in [(["--vram-budget", "12GiB"], "--vram-budget needs a CUDA GPU"),
                           (["--compile", "regional"], "--compile regional needs a CUDA GPU")]:
        proc = cli("train", "--cache", fp32_cache, "--output", tmp_path / flags[0], "--max-steps", "1", "--device", "cpu",
                   *flags, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("c, resolution, peak, img_s", [  # bench/RESULTS.md, 2026-12-01, --cuda-graphs (the default)
    (Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 512, 5.386, 12.197),
    (Candidate(True, "bf16", "adamw", "none", 1, 4), 512, 5.473, 12.21),
    (Candidate(True, "bf16", "adamw8bit", "none", 4, 1), 512, 5.981, 30.856),
    (Candidate(True, "bf16", "adamw8bit", "none", 1, 4), 1024, 5.98, 7.294),
    (Candidate(True, "nf4", "adamw8bit", "none", 1, 4), 512, 2.395, 9.038),
    (Candidate(True, "nf4", "adamw8bit", "none", 4, 1), 512, 3.103, 22.775),
    (Candidate(True, "nf4", "adamw8bit", "none", 1, 4), 1024, 3.013, 5.501),  # 2026-12-02 (second session)
])
def test_graph_estimates_reproduce_the_measurements_within_10_percent(c, resolution, peak, img_s):
    e = estimate(c, resolution, graphs=True)
    assert abs(e.peak_gib - peak) <= (0.03 if c.base_weights == "nf4" else 0.1) * peak and abs(e.images_per_s - img_s) <= 0.1 * img_s, e


def test_graphs_make_the_plan_assume_graph_speed_and_a_measured_graph_row_wins():
    eager, graphs = Choices(), Choices(cuda_graphs=True)
    c = Candidate(True, "bf16", "adamw8bit", "none", 1, 4)
    assert estimate(c, 512, graphs=True).images_per_s > 8 * estimate(c, 512).images_per_s
    row = {"resolution": 512, "micro_batch": 1, "grad_accum": 4, "checkpointing": True, "base_weights": "bf16",
           "optimizer": "adamw8bit", "compile": "none", "cuda_graphs": True, "peak_allocated_gib": 5.0, "images_per_s": 20.0}
    assert estimate(c, 512, [row], graphs=True).peak_measured and not estimate(c, 512, [row]).peak_measured
    assert plan(6 * GIB, 512, 4, allowed=graphs).estimate.images_per_s > plan(6 * GIB, 512, 4, allowed=eager).estimate.images_per_s


def test_train_names_a_much_faster_configuration_when_the_card_has_memory_to_spare(monkeypatch):
    import types

    import torch

    import stages.device
    from stages.config import TrainConfig
    from stages.plan import suggest_budget
    monkeypatch.setattr(stages.device, "resolve_precision", lambda *a: torch.bfloat16)
    card = types.SimpleNamespace(total_memory=80 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: card)
    cuda = torch.device("cuda")
    note = suggest_budget(TrainConfig(), cuda, 512)  # the reference recipe on an 80 GiB card
    assert note.startswith("note: this GPU could train faster: --vram-budget 80GiB would pick ")
    assert "no checkpointing" in note and "micro-batch 4 × grad-accum 1" in note and "x this configuration's" in note
    fastest = TrainConfig(gradient_checkpointing=False, optimizer="adamw", compile="regional", batch_size=4, grad_accum=1)
    assert suggest_budget(fastest, cuda, 512) is None  # already (about) the fastest: no note
    assert suggest_budget(TrainConfig(compile="regional-graphs"), cuda, 512) is None  # not a planner option
    assert "this configuration's" in suggest_budget(TrainConfig(base_weights="int8"), cuda, 512)  # int8: never planned


def test_a_sweeps_members_add_their_lora_state_and_activations_and_the_16_member_target_fits_24_gib():
    from stages.plan import ACTIVATIONS_GIB, LORA_BYTES_PER_PARAM, LORA_PARAMS, estimate_peak_gib, plan
    one, four = (estimate_peak_gib(Candidate(True, "bf16", "adamw8bit", "none", 1, 4, members=k), 512, graphs=True)
                 for k in (1, 4))
    assert four - one == pytest.approx(3 * (LORA_PARAMS * LORA_BYTES_PER_PARAM["adamw8bit"] / GIB + ACTIVATIONS_GIB[True][0]))
    graphs = Choices(gradient_checkpointing=(True,), base_weights=("bf16",), optimizer=("adamw8bit",),
                     compile=("none",), cuda_graphs=True)
    sixteen = plan(24 * GIB, 512, 4, allowed=graphs, members=16)  # the 4 learning rates × 4 ranks (r16 each)
    assert sixteen.needed_gib <= 24 and sixteen.choice.members == 16 and "16 sweep members" in sixteen.reason
    with pytest.raises(UserError, match="16 sweep members"):
        plan(8 * GIB, 512, 4, allowed=graphs, members=16)


def test_a_sweep_that_does_not_fit_together_trains_in_rounds_of_what_fits_and_one_member_too_many_is_an_error(monkeypatch):
    import torch

    import stages.device
    import stages.plan
    from stages.config import TrainConfig, parse_size
    from stages.plan import fit_vram_budget
    monkeypatch.setattr(stages.device, "cap_gpu_memory", lambda device, budget, log: (parse_size(budget), 0))
    graphs = Choices(gradient_checkpointing=(True,), base_weights=("bf16",), optimizer=("adamw8bit",),
                     compile=("none",), cuda_graphs=True)
    monkeypatch.setattr(stages.plan, "_allowed_here", lambda cfg, device: graphs)
    cuda, logs = torch.device("cuda"), []
    cfg, budget, _, planned, refit, together = fit_vram_budget(TrainConfig(vram_budget="8GiB"), cuda, 512, logs.append, 16)
    assert together == 4 and budget == 8 * GIB  # the most that fit: 5 do not
    assert plan(8 * GIB, 512, 4, allowed=graphs, members=4).choice.members == 4
    with pytest.raises(UserError):
        plan(8 * GIB, 512, 4, allowed=graphs, members=5)
    assert logs[0] == "the 16 sweep members do not fit in 8.00 GiB together: 4 rounds of ≤ 4 members"
    assert "4 sweep members" in logs[1] and planned <= 8 * GIB and "--batch-size" in refit(1.1)
    assert fit_vram_budget(TrainConfig(vram_budget="24GiB"), cuda, 512, logs.append, 16)[-1] == 16  # all together
    with pytest.raises(UserError) as error:  # the base alone is ~4.8 GiB: not even one member fits
        fit_vram_budget(TrainConfig(vram_budget="4GiB"), cuda, 512, logs.append, 16)
    assert "no configuration fits at 512², effective batch 4;" in str(error.value)  # one member's need, as a single run's
    assert "sweep members" not in str(error.value)
    assert "\n" not in str(error.value) and "round" not in str(error.value)
