"""flux_core.seq2seq: training falls, resume is bit-identical, sampling is seeded, the time convention is shared
with the image sampler, any token widths, the CLI end to end. Tiny models only."""
import json
import re
from dataclasses import fields

import pytest
import torch
from safetensors.torch import save_file

from flux_core.checkpoint import CheckpointError, load_safetensors
from flux_core.model import Flux, FluxParams, preset
from flux_core.pipeline import Conditioning, sample as image_sample
from flux_core.sampling import FlowMatch, grid_ids, sequence_ids
from flux_core.seq2seq import (
    Batch, Layout, Seq2Seq, ShapeTask, TensorTask, Trainer, TrainConfig, load_run, position_ids, sample,
)  # fmt: skip
from flux_core.seq2seq.__main__ import _parser, main
from flux_core.seq2seq.demo import DEMO_THREADS, chamfer, compare, draw_conditions, shape_condition, shape_points

TINY = dict(vec_in_dim=0, hidden_size=16, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
            axes_dim=[2, 2, 4], theta=10_000, qkv_bias=True, guidance_embed=False)  # fmt: skip


def tiny_params(data_dim: int = 2, cond_dim: int = 4, **overrides) -> FluxParams:
    return FluxParams(in_channels=data_dim, out_channels=data_dim, context_in_dim=cond_dim, **{**TINY, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and far faster than two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_trainer(steps: int = 6, batch_size: int = 4, **config) -> Trainer:
    task = ShapeTask(num_points=16, train_points=8)
    return Trainer(tiny_params(), task, TrainConfig(steps=steps, batch_size=batch_size, warmup=2, **config))


def test_loss_falls_on_a_tiny_run():
    trainer = tiny_trainer(steps=100, batch_size=32, lr=1e-2)
    trainer.train(progress=False)
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_resume_is_bit_identical(tmp_path):
    config = dict(grad_accum=2, ema_decay=0.9, grad_clip=0.5, weight_decay=0.01)
    whole = tiny_trainer(**config)
    whole.train(progress=False)

    first = tiny_trainer(**config)
    first.train(tmp_path, until=3, progress=False)
    resumed = Trainer.resume(tmp_path, ShapeTask(num_points=16, train_points=8))
    assert resumed.step == 3
    resumed.train(progress=False)

    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.run.model.state_dict().items(), resumed.run.model.state_dict().values()):
        assert torch.equal(a, b), name
    for name in whole.ema:
        assert torch.equal(whole.ema[name], resumed.ema[name]), name
    for p, q in zip(whole.run.model.parameters(), resumed.run.model.parameters()):
        a, b = whole.optimizer.state[p], resumed.optimizer.state[q]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(whole.data_rng.get_state(), resumed.data_rng.get_state())
    assert torch.equal(whole.noise_rng.get_state(), resumed.noise_rng.get_state())
    # and the trainer really moved: a resume that restored nothing would start from a fresh init
    assert not torch.equal(whole.run.model.img_in.weight, tiny_trainer(**config).run.model.img_in.weight)


def test_checkpoint_loads_for_sampling_and_sampling_is_seeded(tmp_path):
    trainer = tiny_trainer(steps=4)
    trainer.train(tmp_path, progress=False)
    run = load_run(tmp_path)
    for name, weight in trainer.ema.items():  # model.safetensors holds the EMA weights
        assert torch.equal(run.model.state_dict()[name], weight), name
    cond = draw_conditions(3, torch.Generator().manual_seed(5))
    a, b = sample(run, cond, seed=7, steps=4), sample(run, cond, seed=7, steps=4)
    assert a.shape == (3, 8, 2) and torch.equal(a, b)
    assert not torch.allclose(a, sample(run, cond, seed=8, steps=4))
    one_by_one = torch.cat([sample(run, cond[i : i + 1], seed=7 + i, steps=4) for i in range(3)])
    torch.testing.assert_close(a, one_by_one, rtol=1e-5, atol=1e-5)
    # i.i.d. set tokens: 20 points are 3 independent groups of the trained 8, cut to 20
    long = sample(run, cond, seed=7, steps=4, data_len=20)
    assert long.shape == (3, 20, 2) and torch.equal(long[:, :8], a)
    heun = sample(run, cond, seed=7, steps=4, method="heun")
    assert heun.shape == a.shape and not torch.equal(heun, a)


class PointMassOracle(Flux):
    """The velocity that minimises the training loss when every data item is `target`, written in the
    convention x_t = (1 - t) x0 + t noise: v = noise - x0 = (x_t - target) / t."""

    def __init__(self, params: FluxParams, target: torch.Tensor):
        super().__init__(params)
        self.target = target

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None):
        return (img - self.target) / timesteps.view(-1, 1, 1)


def test_objective_and_image_sampler_share_the_time_convention():
    """If the training objective flipped its time (t = 1 data), the oracle would not zero its loss; if the image
    sampler flipped (integrating from t = 0, or starting from data), it would not land on the target."""
    target = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0)) + 2
    oracle = PointMassOracle(tiny_params(data_dim=64, cond_dim=8), target)
    run = Seq2Seq(oracle, Layout(1, [0.0] * 64, [1.0] * 64, "set", "set"), FlowMatch(shift=False))
    generator = torch.Generator().manual_seed(1)
    batch_t = torch.tensor([0.9, 0.5, 0.1])
    batch = Batch(cond=torch.zeros(3, 2, 8), data=target.expand(3, -1, -1))
    assert run.loss(batch, batch_t, generator).item() < 1e-10

    latent = torch.zeros(1, 16, 2, 2)  # text-to-image start: the sampler draws the noise itself
    no_text = Conditioning(torch.zeros(1, 2, 8))
    image = image_sample(oracle, no_text, latent, seed=3, steps=5, flow=FlowMatch(shift=False))
    packed_target = target.view(1, 16, 2, 2)  # (c, ph, pw) feature order of one 2x2 patch
    torch.testing.assert_close(image, packed_target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sample(run, torch.zeros(1, 2, 8), seed=3, steps=5), target, rtol=1e-4, atol=1e-4)
    heun = sample(run, torch.zeros(1, 2, 8), seed=3, steps=5, method="heun")
    torch.testing.assert_close(heun, target, rtol=1e-4, atol=1e-4)


def test_any_widths_grid_ids_and_pooled_y(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"cond": torch.randn(20, 5, 3, generator=generator), "y": torch.randn(20, 4, generator=generator),
               "data": torch.randn(20, 6, 7, generator=generator) * 3 + 1}  # fmt: skip
    save_file(tensors, tmp_path / "pairs.safetensors")
    task = TensorTask(tmp_path / "pairs.safetensors", data_ids="grid:2x3", holdout=0.25)
    assert task.train_count == 15 and task.layout.data_len == 6
    torch.testing.assert_close(torch.tensor(task.layout.data_mean), tensors["data"][:15].mean((0, 1)))
    params = tiny_params(data_dim=7, cond_dim=3, vec_in_dim=4)
    trainer = Trainer(params, task, TrainConfig(steps=2, batch_size=4, bf16=True))
    trainer.train(tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.layout.data_ids == "grid:2x3"
    out = sample(run, tensors["cond"][:2], seed=0, steps=2, y=tensors["y"][:2])
    assert out.shape == (2, 6, 7)
    loss = task.evaluate(run, steps=0, seed=0)["val_loss"]
    assert 0 < loss < 100
    with pytest.raises(ValueError, match="pass y"):
        sample(run, tensors["cond"][:2], seed=0, steps=2)
    with pytest.raises(ValueError, match=r"y must be \(batch, 4\)"):
        sample(run, tensors["cond"][:2], seed=0, steps=2, y=tensors["y"][:2, :3])


def test_position_ids():
    assert torch.equal(sequence_ids(3, n_axes=2), torch.tensor([[[0.0, 0], [0, 1], [0, 2]]]))
    assert torch.equal(grid_ids(2, 2, n_axes=3)[0, :, 1:], torch.tensor([[0.0, 0], [0, 1], [1, 0], [1, 1]]))
    assert torch.equal(position_ids("set", 4, 3), torch.zeros(1, 4, 3))
    assert torch.equal(position_ids("grid:2x3", 6, 3), grid_ids(2, 3))
    with pytest.raises(ValueError, match="holds 6 tokens"):
        position_ids("grid:2x3", 5, 3)
    with pytest.raises(ValueError, match="unknown token layout"):
        position_ids("ring", 5, 3)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="in_channels = out_channels = 2.*context_in_dim = 4"):
        Trainer(tiny_params(data_dim=3, cond_dim=5), ShapeTask(num_points=16, train_points=8), TrainConfig())
    with pytest.raises(CheckpointError, match="not a seq2seq run"):
        load_run(tmp_path)
    trainer = tiny_trainer(steps=1)
    with pytest.raises(ValueError, match=r"condition tokens must be \(batch, tokens, 4\)"):
        sample(trainer.run, torch.zeros(1, 2, 3), seed=0)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(trainer.run, torch.zeros(1, 2, 4), seed=0, method="rk4")


def test_demo_task_metric_is_honest():
    """True shapes score near the noise floor, another shape kind far above it."""
    generator = torch.Generator().manual_seed(0)
    cond = draw_conditions(8, generator)
    truth, again = shape_points(cond, 512, generator, 0.02), shape_points(cond, 512, generator, 0.02)
    other = cond.clone()
    other[:, 0] = cond[:, 0].roll(1, dims=1)  # same pose, next shape kind
    wrong = shape_points(other, 512, generator, 0.02)
    assert chamfer(truth, again).mean() < 0.02 < 0.03 < chamfer(truth, wrong).mean()
    ellipse = shape_points(shape_condition("ring", (0.5, -0.5), (0.4, 0.2)), 256, generator, 0.0)
    on_ellipse = (((ellipse - torch.tensor([0.5, -0.5])) / torch.tensor([0.4, 0.2])) ** 2).sum(-1)
    torch.testing.assert_close(on_ellipse, torch.ones(1, 256))
    square = shape_points(shape_condition("square", (0.0, 0.0), (0.3, 0.3)), 256, generator, 0.0)
    assert torch.allclose(square.abs().amax(-1), torch.tensor(0.3))  # every point on the box's edge


def test_cli_train_resume_sample_eval(tmp_path, capsys):
    run = str(tmp_path / "run")
    tiny = ["--set", "hidden_size=16", "--set", "num_heads=2", "--set", "axes_dim=[2,2,4]"]
    assert main(["train", "--run", run, "--steps", "2", "--batch-size", "2", *tiny]) == 0
    assert "already holds a run" in cli_error(["train", "--run", run, "--steps", "2"], capsys)
    assert main(["train", "--run", run, "--resume", "--steps", "3"]) == 0
    losses = json.loads((tmp_path / "run" / "train_state.json").read_text())["losses"]
    assert len(losses) == 3
    # the bar and the final line report one quantity, labelled the same: the mean of the last 20 steps
    out, err = capsys.readouterr()
    assert f"loss {sum(losses[-20:]) / len(losses[-20:]):.4f} (mean of last 20 steps)" in out.splitlines()[-1]
    assert "(mean of last 20 steps)" in err
    assert "drop --set, --lr" in cli_error(["train", "--run", run, "--resume", "--lr", "0.1", *tiny[:2]], capsys)
    assert "already at step 3" in cli_error(["train", "--run", run, "--resume"], capsys)

    points = str(tmp_path / "points.safetensors")
    assert main(["sample", "--run", run, "--shapes", "2", "--steps", "2", "--out", points]) == 0
    assert (tmp_path / "points.png").is_file()
    assert "exists" in cli_error(["sample", "--run", run, "--shapes", "2", "--out", points], capsys)
    capsys.readouterr()
    torch.set_num_threads(2)  # eval and sample take the demo's thread count unless told
    assert main(["eval", "--run", run, "--steps", "2"]) == 0
    assert torch.get_num_threads() == DEMO_THREADS
    out, err = capsys.readouterr()
    assert json.loads(out)["chamfer"] > 0
    assert "eval run: 100%" in err and "64/64" in err and "chamfer=" in err and "eval took" in err  # no silent wait
    assert preset("seq2seq-demo").depth_single_blocks == 0


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting a user error: a non-zero exit and one line on stderr, never a traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (exit 2)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


BAD_CLI_INPUT = {  # argv after `train --run RUN`, files in tmp_path, -> words the error must say
    "2-D cond": (["--data", "{tmp}/flat.safetensors"], "cond must be (N, Lc, Cc)"),
    "NaN data": (["--data", "{tmp}/nan.safetensors"], "data holds NaN or infinite values (first at item 3)"),
    "no file": (["--data", "{tmp}/missing.safetensors"], "no such file"),
    "grid misfit": (["--data", "{tmp}/pairs.safetensors", "--data-ids", "grid:3x3"], "data tokens: layout grid:3x3"),
    "holdout": (["--data", "{tmp}/pairs.safetensors", "--holdout", "1"], "holdout must be a fraction in [0, 1)"),
    "ids, no data": (["--cond-ids", "set"], "--cond-ids: only for a --data file"),
    "set not JSON": (["--set", "hidden_size=abc"], "hidden_size takes a finite int written as JSON"),
    "set float": (["--set", "hidden_size=1.5"], "hidden_size takes a finite int"),
    "set NaN": (["--set", "mlp_ratio=NaN"], "mlp_ratio takes a finite float"),
    "set unknown": (["--set", "width=3"], "'width' is not a FluxParams field"),
    "set width": (["--set", "in_channels=3"], "'in_channels' is set from the data's token widths"),
    "set misfit": (["--set", "num_heads=5"], "not divisible by num_heads 5"),
    "config": (["--batch-size", "0", "--lr", "nan"], "batch_size must be >= 1, got 0; lr must be > 0, got nan"),
    "time dist": (["--time-dist", "normal"], "time_dist must be one of uniform, logit_normal, beta"),
    "not an int": (["--steps", "many"], "argument --steps: invalid int value"),
    "preset": (["--preset", "flux-3"], "argument --preset: invalid choice"),
}


@pytest.mark.parametrize("case", BAD_CLI_INPUT)
def test_cli_bad_input_is_one_line(case, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    pairs = {"cond": torch.randn(10, 3, 5, generator=generator), "data": torch.randn(10, 6, 3, generator=generator)}
    save_file(pairs, tmp_path / "pairs.safetensors")
    save_file({**pairs, "cond": pairs["cond"][:, 0].contiguous()}, tmp_path / "flat.safetensors")
    nan = pairs["data"].index_fill(0, torch.tensor([3]), float("nan"))
    save_file({**pairs, "data": nan}, tmp_path / "nan.safetensors")
    argv, words = BAD_CLI_INPUT[case]
    error = cli_error(["train", "--run", str(tmp_path / "run"), *(a.format(tmp=tmp_path) for a in argv)], capsys)
    assert words in error
    assert not (tmp_path / "run" / "train_state.json").exists()


def test_cli_user_errors_outside_train_are_one_line(tmp_path, capsys):
    assert "is not a seq2seq run" in cli_error(["eval", "--run", str(tmp_path)], capsys)
    assert "must be a whole number >= 1" in cli_error(["sample", "--run", str(tmp_path), "--shapes", "0",
                                                        "--out", str(tmp_path / "x.safetensors")], capsys)  # fmt: skip
    assert "must be a whole number >= 1" in cli_error(["eval", "--run", str(tmp_path), "--threads", "0"], capsys)


def test_demo_evaluation_shows_progress(capsys):
    """The demo's evaluation samples 64 shapes four ways: each shows a bar with its time and result."""
    trainer = tiny_trainer(steps=1)
    compare(trainer.task, trainer.ema_run(), trainer.ema_run(), steps=2)
    err = capsys.readouterr().err
    for name in ("trained", "trained_heun", "untrained"):
        assert re.search(rf"eval {name}: 100%.*64/64 \[\d\d:\d\d<.*chamfer=0\.\d{{4}}", err), name
    assert "eval baselines: 100%" in err
    compare(trainer.task, trainer.ema_run(), trainer.ema_run(), steps=2, progress=False)
    assert capsys.readouterr().err == ""


def test_cli_help_shows_every_default(capsys):
    no_default = {"-h,", "--run", "--data", "--cond", "--shapes", "--out", "--data-len"}  # required, or "none: ..."
    for command in ("demo", "train", "sample", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = capsys.readouterr().out.split("\noptions:\n")[1]
        entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", options)]
        for entry in entries:
            flag, *words = entry.split()
            assert len(words) >= 3, f"{command} {flag} has no help"
            assert flag in no_default or "(default: " in entry, f"{command} {flag} shows no default"
        if command == "train":
            assert len(entries) > len(fields(TrainConfig)) + 10
            assert any(e.startswith("--steps STEPS") and "(default: 1000; shapes task: 2500)" in e for e in entries)
    assert _parser().parse_args(["sample", "--run", "r", "--shapes", "1", "--out", "o"]).threads == DEMO_THREADS


def test_cli_on_your_own_tensors(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    pairs = {"cond": torch.randn(10, 3, 5, generator=generator), "data": torch.randn(10, 6, 3, generator=generator)}
    save_file(pairs, tmp_path / "pairs.safetensors")
    save_file({"cond": pairs["cond"][:2]}, tmp_path / "cond.safetensors")
    run = str(tmp_path / "run")
    tiny = ["--set", "hidden_size=16", "--set", "num_heads=2", "--set", "axes_dim=[2,2,4]"]
    main(["train", "--run", run, "--data", str(tmp_path / "pairs.safetensors"), "--data-ids", "grid:2x3",
          "--steps", "2", "--batch-size", "2", *tiny])  # fmt: skip
    main(["train", "--run", run, "--resume", "--steps", "3"])  # the data file comes from the run
    main(["sample", "--run", run, "--cond", str(tmp_path / "cond.safetensors"), "--steps", "2",
          "--out", str(tmp_path / "out.safetensors")])  # fmt: skip
    assert load_safetensors(tmp_path / "out.safetensors")["data"].shape == (2, 6, 3)
    capsys.readouterr()
    main(["eval", "--run", run])
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0
