"""ControlNet++'s consistency reward in the training system (trainer.module) and training.py's
--consistency-weight / --consistency-max-t: the one-step x0 prediction, the reward on the samples at small
timesteps only, gradients through the frozen VAE decoder to the ControlNet, the same loss from a latent cache,
half precision and gradient checkpointing, and the command line."""

from __future__ import annotations

import pytest
import torch

import training
from annotator.consistency import canny_loss
from tests.reference import TINY_CONFIG
from tests.training_helpers import IMAGE_SIZE, make_dataset, read_training_checkpoint, tool_add_control_init, train_args
from trainer.module import DEFAULT_CONSISTENCY_MAX_T, ControlNetTrainer, training_model_config

BATCH = 4


@pytest.fixture(scope="module")
def model_config():
    return training_model_config(TINY_CONFIG)


@pytest.fixture(scope="module")
def init_weights():
    return tool_add_control_init()


def trainer(model_config, init_weights, **options) -> ControlNetTrainer:
    module = ControlNetTrainer(model_config, **options)
    module.load_state_dict(init_weights)
    # The zero convolutions start at zero: give the ControlNet an effect so that its gradients are not all zero.
    with torch.no_grad():
        for parameter in module.model.control_model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return module


def image_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"jpg": torch.rand(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 2 - 1,
            "hint": (torch.rand(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) > 0.9).float(),
            "txt": [f"pair {i}" for i in range(BATCH)]}


def drawn_timesteps(module: ControlNetTrainer, batch_idx: int) -> torch.Tensor:
    """The timesteps batch_loss draws for batch `batch_idx` (the generator's third draw, see its docstring)."""
    generator = module.step_generator(batch_idx)
    z0 = torch.empty(BATCH, module.model.latent_channels, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    torch.randn(z0.shape, generator=generator)  # the posterior sample
    torch.rand(BATCH, generator=generator)  # prompt dropout
    return torch.randint(0, module.model.num_timesteps, (BATCH,), generator=generator)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_predict_start_recovers_x0_from_the_true_target(model_config, parameterization):
    module = ControlNetTrainer(model_config)
    model = module.model
    model.parameterization = parameterization
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 150, 999])
    x_t = model.q_sample(x0, t, noise)
    target = noise if parameterization == "eps" else model.get_v(x0, noise, t)
    torch.testing.assert_close(model.predict_start(x_t, t, target), x0, atol=2e-4, rtol=1e-4)


def test_the_reward_is_canny_magnitudes_of_the_decoded_prediction_at_small_timesteps(model_config, init_weights):
    max_t = 600
    module = trainer(model_config, init_weights, consistency_weight=2.0, consistency_max_t=max_t)
    plain = trainer(model_config, init_weights)
    plain.load_state_dict(module.state_dict())
    batch = image_batch()
    batch_idx = next(i for i in range(100) if 0 < int((drawn_timesteps(module, i) <= max_t).sum()) < BATCH)
    t = drawn_timesteps(module, batch_idx)
    loss, logs = module.batch_loss(batch, batch_idx)
    plain_loss, plain_logs = plain.batch_loss(batch, batch_idx)
    # The diffusion part is the plain loss; the total adds weight x reward.
    torch.testing.assert_close(logs["train/loss_simple"], plain_logs["train/loss_simple"])
    torch.testing.assert_close(loss, plain_loss + 2.0 * logs["train/loss_consistency"])
    assert float(logs["train/loss_consistency"]) > 0

    # By hand: the same draws, x0 predicted in one step, decoded, compared by Canny magnitude with the decoded
    # clean latent, averaged over the samples with t <= max_t only.
    generator = module.step_generator(batch_idx)
    model = module.model
    with torch.no_grad():
        z0 = model.get_first_stage_encoding(module.target_posterior(batch), generator=generator)
        dropped = torch.rand(BATCH, generator=generator) < module.prompt_dropout
        prompts = ["" if drop else prompt for prompt, drop in zip(batch["txt"], dropped.tolist(), strict=True)]
        assert torch.equal(torch.randint(0, model.num_timesteps, (BATCH,), generator=generator), t)
        noise = torch.randn(z0.shape, generator=generator)
        cond = module.conditioning(batch, prompts)
        x_t = model.q_sample(z0, t, noise)
        x0 = model.predict_start(x_t, t, model.apply_model(x_t, t, cond))
        chosen = t <= max_t
        images = (model.decode_first_stage(x0[chosen]) / 2 + 0.5).clamp(0, 1)
        references = (model.decode_first_stage(z0[chosen]) / 2 + 0.5).clamp(0, 1)
        expected = canny_loss(images, cond["c_concat"][0][chosen], references).mean()
    torch.testing.assert_close(logs["train/loss_consistency"], expected, rtol=1e-4, atol=1e-7)


def test_no_reward_without_small_timesteps(model_config, init_weights):
    module = trainer(model_config, init_weights, consistency_weight=5.0, consistency_max_t=0)
    plain = trainer(model_config, init_weights)
    plain.load_state_dict(module.state_dict())
    batch_idx = next(i for i in range(100) if bool((drawn_timesteps(module, i) > 0).all()))
    loss, logs = module.batch_loss(image_batch(), batch_idx)
    assert float(logs["train/loss_consistency"]) == 0.0
    torch.testing.assert_close(loss, plain.batch_loss(image_batch(), batch_idx)[0])


def test_the_reward_trains_the_controlnet_through_the_frozen_decoder(model_config, init_weights):
    module = trainer(model_config, init_weights, consistency_weight=1.0, consistency_max_t=999)
    batch = image_batch()
    generator = module.step_generator(0)
    with torch.no_grad():
        z0 = module.model.get_first_stage_encoding(module.target_posterior(batch), generator=generator)
    t = torch.full((BATCH,), 100)
    noise = torch.randn_like(z0)
    cond = module.conditioning(batch, list(batch["txt"]))
    _, _, x_noisy, output = module.model.denoising_loss(z0, cond, t, noise)
    reward = module.consistency_reward(z0, x_noisy, output, t, cond["c_concat"][0])
    reward.backward()
    grads = [p.grad for p in module.model.control_model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # The frozen parts get none, and the extractor is not part of the model (nor of its state dict).
    assert all(p.grad is None for p in module.model.first_stage_model.parameters())
    assert set(module.state_dict()) == set(trainer(model_config, init_weights).state_dict())


def test_a_cached_batch_gives_the_same_reward(model_config, init_weights):
    module = trainer(model_config, init_weights, consistency_weight=1.0, consistency_max_t=999)
    batch = image_batch()
    with torch.no_grad():
        posterior = module.model.encode_first_stage(batch["jpg"].permute(0, 3, 1, 2)).parameters
        cached = {"posterior": posterior, "context": module.model.get_learned_conditioning(batch["txt"]),
                  "empty_context": module.model.get_learned_conditioning([""] * BATCH),
                  "txt": batch["txt"], "hint": batch["hint"]}
        from_images = module.batch_loss(batch, 3)
        from_cache = module.batch_loss(cached, 3)
    for key in ("train/loss", "train/loss_consistency"):
        torch.testing.assert_close(from_cache[1][key], from_images[1][key], rtol=1e-4, atol=1e-6)


def test_the_reward_under_bf16_autocast_with_half_locked_parts_and_checkpointing(init_weights):
    config = training_model_config(TINY_CONFIG, gradient_checkpointing=True)
    module = trainer(config, init_weights, consistency_weight=1.0, consistency_max_t=999, locked_dtype="bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = module.batch_loss(image_batch(), 0)
    loss.backward()
    assert bool(torch.isfinite(loss)) and float(logs["train/loss_consistency"]) > 0
    grads = [p.grad for p in module.model.control_model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_consistency_options_are_checked(model_config):
    with pytest.raises(ValueError, match="consistency_weight"):
        ControlNetTrainer(model_config, consistency_weight=-1.0)
    with pytest.raises(ValueError, match="consistency_max_t"):
        ControlNetTrainer(model_config, consistency_max_t=-5)


# ---- training.py --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_path(tmp_path_factory, init_weights):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_file(init_weights, str(path))
    return path


def test_training_with_the_reward_runs_resumes_and_records_it(tmp_path, init_path):
    data = make_dataset(tmp_path / "data", 4)
    output = tmp_path / "run"
    argv = train_args(init_path, data, output, "--batch-size", "2", "--consistency-weight", "3",
                      "--consistency-max-t", "999")
    assert training.main(argv + ["--max-steps", "2"]) == 0
    checkpoint = read_training_checkpoint(output / "checkpoints" / "last.ckpt")
    hparams = checkpoint["hyper_parameters"]
    assert hparams["consistency_weight"] == 3.0 and hparams["consistency_max_t"] == 999
    assert not any("hed" in key or "kornia" in key for key in checkpoint["state_dict"])
    assert training.main(argv + ["--max-steps", "3", "--resume", "last"]) == 0
    assert read_training_checkpoint(output / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_the_command_line_defaults_and_refusals(tmp_path, init_path, capsys):
    args = training.parse_args(["--init", "init.safetensors", "--data", "data"])
    assert args.consistency_weight == 0.0
    assert args.consistency_max_t == DEFAULT_CONSISTENCY_MAX_T == 200
    with pytest.raises(SystemExit) as exit_info:
        training.parse_args(["--init", "x", "--data", "y", "--consistency-weight", "-1"])
    assert exit_info.value.code == 2
    # A control type without a differentiable reward: one line naming the types that have one, exit 2.
    data = make_dataset(tmp_path / "data", 2)
    (data / "control.json").write_text('{"name": "scribble", "settings": {}, "model": null}\n')
    capsys.readouterr()
    status = training.main(train_args(init_path, data, tmp_path / "run", "--batch-size", "1", "--max-steps", "1",
                                      "--consistency-weight", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "scribble" in err[0] and "canny" in err[0], err


def test_descending_the_reward_lowers_it(model_config, init_weights):
    """The reward's gradient points the right way: a few AdamW steps on the reward alone (fixed batch, noise and
    timesteps) lower it steadily."""
    module = trainer(model_config, init_weights, consistency_weight=1.0, consistency_max_t=999)
    batch = image_batch()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = module.model.get_first_stage_encoding(module.target_posterior(batch).mode())
    t = torch.full((BATCH,), 150)
    noise = torch.randn(z0.shape, generator=generator)
    cond = module.conditioning(batch, list(batch["txt"]))
    optimizer = torch.optim.AdamW(module.model.control_model.parameters(), lr=1e-3)
    rewards = []
    for _ in range(15):
        optimizer.zero_grad()
        _, _, x_noisy, output = module.model.denoising_loss(z0, cond, t, noise)
        reward = module.consistency_reward(z0, x_noisy, output, t, cond["c_concat"][0])
        reward.backward()
        optimizer.step()
        rewards.append(float(reward))
    assert rewards[-1] < 0.85 * rewards[0], rewards
