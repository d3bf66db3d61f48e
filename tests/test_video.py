"""Video: the spatio-temporal patch codec, 3D latents in the model (with text, alone, mixed with
0D-2D), the moving-digits data and judges of `examples/video.py`, and `train_video.main` end to end."""

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import randint, randn

from conftest import randomized, tiny_transformer
from transfusion_pytorch import BucketBatchSampler, Transfusion
from transfusion_pytorch.autoencoders import VideoEncoder
from transfusion_pytorch.codecs import Patchify, VideoPatchify, VideoUnpatchify
from transfusion_pytorch.examples import video as V
from transfusion_pytorch.training import native_amp, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("train_video", ROOT / "train_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ codec


def test_video_patchify_round_trip_and_layout():
    videos = randn(2, 3, 4, 8, 12)  # (b, c, frames, h, w)
    latents = VideoPatchify(4, frame_patch_size=2)(videos)
    assert latents.shape == (2, 3 * 2 * 16, 2, 2, 3)
    # one token = one 2×4×4 tube of each channel, in (c, frame, row, column) order
    assert torch.equal(latents[1, :32, 1, 0, 2], videos[1, 0, 2:4, 0:4, 8:12].reshape(-1))
    assert torch.equal(VideoUnpatchify(4, frame_patch_size=2)(latents), videos)
    # with one frame per tube it is Patchify on every frame
    per_frame = VideoPatchify(4)(videos)
    assert torch.equal(per_frame[:, :, 3], Patchify(4)(videos[:, :, 3]))
    assert torch.equal(VideoUnpatchify(4)(per_frame), videos)
    # one clip without a batch axis (modality_encoder_decoder_requires_batch_dim=False)
    assert torch.equal(VideoUnpatchify(2, 2)(VideoPatchify(2, 2)(videos[0])), videos[0])


def test_video_patchify_bad_arguments():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="`patch_size`"):
            VideoPatchify(bad)
        with pytest.raises(ValueError, match="`frame_patch_size`"):
            VideoUnpatchify(4, frame_patch_size=bad)
    with pytest.raises(ValueError, match="frame_patch_size"):
        VideoPatchify(4, 2)(randn(1, 1, 3, 8, 8))  # 3 frames into tubes of 2
    with pytest.raises(ValueError, match="patch_size"):
        VideoPatchify(4, 2)(randn(1, 1, 4, 6, 8))
    with pytest.raises(ValueError, match="`videos`"):
        VideoPatchify(4)(randn(1, 8, 8))
    with pytest.raises(TypeError, match="`videos`"):
        VideoPatchify(4)(torch.ones(1, 1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`latents` channels"):
        VideoUnpatchify(4, 2)(randn(1, 16, 2, 2, 2))


# ------------------------------------------------------------------ 3D latents in the model


def video_model(**kwargs) -> Transfusion:
    kwargs.setdefault("modality_default_shape", (2, 2, 2))
    return Transfusion(
        num_text_tokens=16,
        dim_latent=8,  # 1 channel × 2 × 2 × 2 tube
        channel_first_latent=True,
        modality_encoder=VideoPatchify(2, 2),
        modality_decoder=VideoUnpatchify(2, 2),
        add_pos_emb=True,
        transformer=tiny_transformer(),
        **kwargs,
    )


def test_interleaved_text_and_video_forward_backward():
    model = video_model()
    batch = [
        [randint(0, 16, (5,)), randn(1, 4, 4, 4), randint(0, 16, (3,))],  # text, a 4-frame clip, text
        [randn(1, 2, 4, 6), randint(0, 16, (4,))],  # a 2-frame clip of another size first
    ]
    loss, breakdown = model(batch, return_breakdown=True)
    loss.backward()
    assert torch.isfinite(loss) and breakdown.text > 0 and breakdown.flow[0] > 0
    heads = model.modality_heads[0]
    assert heads.pos_emb is not None and heads.latent_to_model.weight.grad.abs().sum() > 0
    assert model.token_lengths(batch) == [1 + 5 + 1 + 5 + 1 + 8 + 1 + 3 + 1, 1 + 1 + 5 + 1 + 6 + 1 + 4 + 1]  # "2,2,2" is 5 meta characters


def test_video_only_training_and_generation_at_a_requested_frame_count():
    model = video_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    clips = randn(4, 1, 4, 4, 4)
    losses = []
    for _ in range(3):
        loss = model(clips, modality_type=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    # (3, 2, 2) latent tokens = 6 frames of 4×4 through the 2×2×2 tubes
    videos = model.generate_modality_only(batch_size=2, fixed_modality_shape=(3, 2, 2), modality_steps=2)
    assert videos.shape == (2, 1, 6, 4, 4)
    # through the interleaved sampler: the prompt opens a clip of the requested shape
    before, _ = model.ids.modality_wrapper(0, (1, 2, 2))
    sample = model.sample(prompt=torch.tensor([3, 4, *before]), max_length=4, modality_steps=2)
    clip = next(item[1] for item in sample if isinstance(item, tuple))
    assert clip.shape == (1, 2, 4, 4)


def test_0d_1d_2d_3d_in_one_sample():
    model = Transfusion(
        num_text_tokens=32,
        dim_latent=(8, 6, 4, 5),
        modality_default_shape=((), (6,), (3, 3), (2, 2, 2)),
        add_pos_emb=(False, True, True, True),
        transformer=tiny_transformer(),
    )
    sample = [randint(0, 32, (4,)), (0, randn(8)), (1, randn(6, 6)), randint(0, 32, (2,)), (2, randn(3, 3, 4)), (3, randn(2, 2, 2, 5))]
    loss, breakdown = model([sample], return_breakdown=True)
    loss.backward()
    assert len(breakdown.flow) == 4 and all(torch.isfinite(f) and f > 0 for f in breakdown.flow)
    for k in range(4):  # every modality's projection learnt from this one sample
        assert model.modality_heads[k].model_to_latent.weight.grad.abs().sum() > 0
    opened = torch.tensor([*model.ids.encode_shape((2, 1, 2)), model.som_ids[3]])
    out = model.sample(prompt=[*sample[:5], opened], max_length=6, modality_steps=2)
    video = [item[1] for item in out if isinstance(item, tuple) and item[0] == 3]
    assert video[-1].shape == (2, 1, 2, 5)


def test_positions_that_differ_only_in_time_get_different_embeddings():
    shape = (4, 2, 3)  # (time, height, width)
    model = randomized(Transfusion(num_text_tokens=8, dim_latent=5, modality_default_shape=shape, add_pos_emb=True, transformer=tiny_transformer())).eval()
    no_pos = randomized(Transfusion(num_text_tokens=8, dim_latent=5, modality_default_shape=shape, add_pos_emb=False, transformer=tiny_transformer())).eval()

    embeddings = model.modality_heads[0].position_embeddings([shape]).reshape(*shape, -1)
    for t1 in range(shape[0]):
        for t2 in range(t1 + 1, shape[0]):
            gaps = (embeddings[t1] - embeddings[t2]).norm(dim=-1)  # (h, w): same place, other time
            assert bool((gaps > 1e-3 * embeddings.norm(dim=-1).mean()).all()), (t1, t2)

    # a clip whose frames are all the same: only the time embedding tells the frames apart
    frame = randn(1, 1, *shape[1:], 5)
    still = frame.expand(1, shape[0], *shape[1:], 5).contiguous()
    t = torch.tensor([0.5])
    with torch.no_grad():
        plain = no_pos(still, times=t, return_loss=False)
        timed = model(still, times=t, return_loss=False)
    assert torch.allclose(plain, plain[:, :1].expand_as(plain), atol=1e-5)  # without it the frames get one velocity
    for t1 in range(shape[0]):
        for t2 in range(t1 + 1, shape[0]):
            assert not torch.allclose(timed[:, t1], timed[:, t2], atol=1e-4), (t1, t2)


# ------------------------------------------------------------------ moving digits


def fake_digits(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` 28×28 'digits' in [-1, 1]: a bright blob on the background, labels 0-9 in turn."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((count, 1, 28, 28), -1.0)
    for i in range(count):
        y, x = torch.randint(6, 14, (2,), generator=generator).tolist()
        images[i, 0, y : y + 8, x : x + 8] = torch.rand(8, 8, generator=generator) * 2 - 1
    return images, torch.arange(count) % 10


def test_captions_round_trip_and_parse():
    for label in range(10):
        for direction in range(4):
            text = V.caption_text(label, direction)
            ids = V.encode_caption(text)
            assert ids.max() < V.NUM_TEXT_TOKENS and (ids == V.SPACE_ID).sum() == 2
            assert V.decode_caption(torch.cat((ids, torch.tensor([V.NUM_TEXT_TOKENS + 1, 3])))) == text  # stops at eos
            parsed = V.parse_caption(text)
            assert (parsed.digit, parsed.direction) == (label, direction)
    assert V.caption_text(3, 0, 3, speeds=(1, 3)) == "three moving left quickly"
    assert V.parse_caption("three moving sideways").direction is None and V.parse_caption("tree").digit is None
    with pytest.raises(ValueError, match="`word`"):
        V.encode_caption("Three moving left")
    with pytest.raises(ValueError, match="`speed`"):
        V.caption_text(3, 0, 2, speeds=(1, 3))


def test_clips_move_by_their_speed_and_bounce_inside_the_frame():
    images, labels = fake_digits(40)
    motions = V.draw_motions(40, (2, 3), torch.Generator().manual_seed(0))
    clips = torch.stack(V.render_clips(V.digit_boxes(images), motions, 12))
    assert clips.shape == (40, 1, 12, 32, 32) and clips.min() >= -1 and clips.max() <= 1
    velocity = motions.velocity()
    for clip, start, v in zip(clips, motions.start, velocity):
        ys, xs = V.bounce(start[0], v[0], 12), V.bounce(start[1], v[1], 12)
        assert ys.min() >= 0 and xs.min() >= 0 and ys.max() <= V.LIMIT and xs.max() <= V.LIMIT
        # the first MIN_RUN steps go straight in the clip's direction, at its speed
        assert torch.equal(ys[1 : V.MIN_RUN + 1] - ys[: V.MIN_RUN], v[0].expand(V.MIN_RUN))
        assert torch.equal(xs[1 : V.MIN_RUN + 1] - xs[: V.MIN_RUN], v[1].expand(V.MIN_RUN))
        # frame t holds the digit of frame 0 at the corner's new place, and nothing else
        for t in (1, 7, 11):
            assert torch.equal(
                clip[0, t, ys[t] : ys[t] + V.DIGIT_SIZE, xs[t] : xs[t] + V.DIGIT_SIZE], clip[0, 0, ys[0] : ys[0] + V.DIGIT_SIZE, xs[0] : xs[0] + V.DIGIT_SIZE]
            )
            assert float(clip[0, t].sum()) == pytest.approx(float(clip[0, 0].sum()), abs=1e-3)
    assert set(motions.direction.tolist()) == {0, 1, 2, 3} and set(motions.speed.tolist()) == {2, 3}


def test_clips_of_mixed_lengths_are_the_digit_pasted_frame_by_frame():
    images, _ = fake_digits(30)
    boxes, motions = V.digit_boxes(images), V.draw_motions(30, (1, 3), torch.Generator().manual_seed(1))
    counts = [2 + 2 * (i % 5) for i in range(30)]  # 2 … 10 frames, interleaved: rendered in groups, returned in order
    clips = V.render_clips(boxes, motions, counts)
    for box, start, v, f, clip in zip(boxes, motions.start, motions.velocity(), counts, clips):
        pasted = torch.full((1, f, 32, 32), -1.0)
        for t, (y, x) in enumerate(zip(V.bounce(start[0], v[0], f).tolist(), V.bounce(start[1], v[1], f).tolist())):
            pasted[:, t, y : y + V.DIGIT_SIZE, x : x + V.DIGIT_SIZE] = box
        assert torch.equal(clip, pasted)


def test_direction_judge_reads_real_clips_and_fails_on_wrong_ones():
    images, labels = fake_digits(60)
    held_out = V.eval_clips(images, labels, frames=8, speeds=(2,), seed=1)
    truth = held_out.motions.direction.tolist()
    assert V.judge_directions(held_out.videos) == truth
    mirrored = {0: 1, 1: 0, 2: 2, 3: 3}  # a left-right flip swaps left and right
    assert V.judge_directions(held_out.videos.flip(-1)) == [mirrored[d] for d in truth]
    assert V.judge_directions(held_out.videos.transpose(-1, -2)) == [{0: 2, 1: 3, 2: 0, 3: 1}[d] for d in truth]
    still = held_out.videos[:, :, :1].expand(-1, -1, 8, -1, -1)
    assert V.judge_directions(still) == [None] * 60  # a digit that does not move has no direction
    assert V.judge_directions(torch.full((2, 1, 8, 32, 32), -1.0)) == [None, None]  # nor does an empty clip


def test_digit_judge_takes_the_majority_over_frames():
    class ByBrightness(torch.nn.Module):  # a stand-in classifier: the digit is the crop's mean ink, in twentieths
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # `classify` reads the device off a parameter

        def forward(self, images):
            ink = ((images + 1) / 2).mean(dim=(1, 2, 3)) * 20
            return torch.nn.functional.one_hot(ink.long().clamp(0, 9), 10).float()

    clip = torch.full((1, 1, 8, 32, 32), -1.0)
    for t in range(8):
        level = 0.2 if t < 5 else 0.6  # 5 frames of one brightness, 3 of another
        clip[0, 0, t, 4:18, 6:20] = level * 2 - 1
    crops = V.crop_digits(clip)
    assert crops.shape == (8, 1, 28, 28)
    frame_votes = ByBrightness()(crops).argmax(-1)
    assert len(set(frame_votes[:5].tolist())) == 1 and frame_votes[0] != frame_votes[7]
    assert V.judge_digits(ByBrightness(), clip).tolist() == [int(frame_votes[0])]


def test_moving_digits_bucketed_by_frame_count():
    images, labels = fake_digits(48)
    frames = V.frame_counts(48, 4, 8, 2, torch.Generator().manual_seed(0))
    assert set(frames) == {4, 6, 8}
    dataset = V.MovingDigits(images, labels, frames, seed=0)
    sampler = BucketBatchSampler(frames, batch_size=4, keys=frames, seed=0, drop_last=True)
    seen = set()
    for indices in sampler:
        clips, captions = dataset.clips(indices, epoch=0)
        assert len({clip.shape[1] for clip in clips}) == 1  # one frame count per batch
        seen.add(clips[0].shape[1])
        assert all(V.parse_caption(c).digit == int(labels[i]) for c, i in zip(captions, indices))
    assert seen == {4, 6, 8}
    # the same epoch gives the same clips, another epoch other motions
    again, _ = dataset.clips([0, 1], epoch=0)
    first, _ = V.MovingDigits(images, labels, frames, seed=0).clips([0, 1], epoch=0)
    other, _ = dataset.clips([0, 1], epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(again, first)) and not all(torch.equal(a, b) for a, b in zip(again, other))


def test_resumed_batch_stream_continues_where_it_stopped():
    script = load_script()
    images, labels = fake_digits(20)
    frames = [8] * 10 + [6] * 10
    dataset = V.MovingDigits(images, labels, frames, seed=3)
    sampler = BucketBatchSampler(frames, batch_size=4, keys=frames, seed=3, drop_last=True)
    stream = script.clip_batches(sampler, 0)
    full = [next(stream) for _ in range(13)]  # 4 batches an epoch: into the fourth epoch
    assert [epoch for _, epoch in full] == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    resumed = script.clip_batches(sampler, 9)
    for indices, epoch in full[9:]:
        assert next(resumed) == (indices, epoch)
        clips, captions = dataset.clips(indices, epoch)
        again, same = dataset.clips(list(indices), epoch)  # rendering depends on (seed, epoch, indices) only
        assert captions == same and all(torch.equal(a, b) for a, b in zip(clips, again))


def test_warped_digits_are_distorted_per_epoch_and_only_where_asked():
    images, labels = fake_digits(16)
    dataset = V.MovingDigits(images, labels, [8] * 16, seed=0)
    boxes = dataset.digits
    # the identity map gives the digits back (bilinear sampling at the pixel centres)
    still = V.warp_digits(boxes, torch.Generator().manual_seed(0), degrees=0.0, zoom=(1.0, 1.0), shear=0.0)
    assert torch.allclose(still, boxes, atol=1e-5)
    warped = dataset.warped(0)
    assert warped.shape == boxes.shape and warped.min() >= -1.0 and warped.max() <= 1.0
    assert all(not torch.allclose(w, b, atol=1e-2) for w, b in zip(warped, boxes))  # every digit moved
    assert torch.equal(V.MovingDigits(images, labels, [8] * 16, seed=0).warped(0), warped)  # (seed, epoch) fixes it
    assert not torch.allclose(dataset.warped(1), warped)
    mask = torch.tensor([True, False, True, False])
    plain, captions = dataset.clips([0, 1, 2, 3], epoch=0)
    mixed, same = dataset.clips([0, 1, 2, 3], epoch=0, warp=mask)
    assert captions == same  # the motions (and so the captions) do not depend on the warp
    assert [not torch.equal(a, b) for a, b in zip(plain, mixed)] == mask.tolist()
    with pytest.raises(TypeError, match="warp"):
        dataset.clips([0, 1], epoch=0, warp=torch.ones(3, dtype=torch.bool))
    for bad in (dict(degrees=-1.0), dict(shear=-0.1), dict(zoom=(1.1, 0.9)), dict(zoom=(0.0, 1.0))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            V.warp_digits(boxes, torch.Generator(), **bad)


# ------------------------------------------------------------------ train_video.py


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


TINY = (
    "--frame-patch-size 2 --dim 16 --depth 1 --heads 1 --batch-size 4 --warmup 1 --log-every 1 --eval-samples 4 --eval-captions 4 --modality-steps 2 "
    "--classifier-epochs 1 --num-eval 20 --checkpoint-every 0 --device cpu --threads 1 --ae-steps 3 --ae-width 4 --ae-channels 4 --no-compile"
).split()  # eager: compiling (the default, tested against eager in test_transformer.py) takes a minute


def tiny_digits(tmp_path: Path) -> Path:
    images, labels = fake_digits(60)  # 40 training 'digits', 20 held out: a pipeline test, not a learning one
    data = tmp_path / "data"
    data.mkdir()
    write_idx(data / "train-images-idx3-ubyte.gz", ((images[:, 0] + 1) * 127.5).round().numpy())
    write_idx(data / "train-labels-idx1-ubyte.gz", labels.numpy())
    return data


def test_main_trains_writes_checkpoint_gif_eval_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    script = load_script()
    data = tiny_digits(tmp_path)
    out = tmp_path / "run"
    parse = script.build_parser().parse_args
    fit, fit_lrs, fit_batch_sizes = script.fit_autoencoder, [], set()

    def spy(encoder, decoder, batches, steps, lr, **kwargs):
        fit_lrs.append(lr)
        return fit(encoder, decoder, (fit_batch_sizes.add(len(clips)) or clips for clips in batches), steps, lr, **kwargs)

    monkeypatch.setattr(script, "fit_autoencoder", spy)

    fitting = ["--ae-lr", "3e-3", "--ae-batch-size", "3"]
    report = script.main(parse([*TINY, "--data-dir", str(data), "--steps", "2", "--min-frames", "4", "--out", str(out), *fitting, "--text-loss-weight", "2.5"]))
    assert fit_lrs == [3e-3] and fit_batch_sizes == {3}  # --ae-lr and --ae-batch-size reach the fit
    latest = out / "checkpoints" / "latest.pt"
    assert read_checkpoint(latest)["step"] == 2
    saved = json.loads((out / "eval.json").read_text())
    for key in ("digit_accuracy", "direction_accuracy", "captioning_accuracy"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == report[key]
    assert saved["step"] == 2 and saved["judge_direction_accuracy_real"] == 1.0 and saved["command"].startswith("python ")
    assert set(saved["weights"]) == {"ema"}
    assert saved["train_precision"] == ("bf16" if native_amp("cpu") else "fp32")  # the default follows the CPU

    from PIL import Image

    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (2 * (1 * 34 + 2), 2 * (4 * 34 + 2))  # one column, a row per prompt

    # the checkpoint rebuilds the model (codec included) and turns a prompt into a GIF, as the demo does
    sampler = V.load_sampler(latest)
    encoder = sampler.modality_heads[0].encoder
    assert isinstance(encoder, VideoEncoder) and encoder.frame_patch_size == 2 and encoder.latent_channels == 4  # the default codec, fitted first
    assert sampler.text_loss_weight == 2.5  # --text-loss-weight reaches the model, and its checkpoint keeps it
    fitted = {k: v for k, v in read_checkpoint(latest)["model"].items() if ".encoder." in k or ".decoder." in k}
    assert fitted["modality_heads.0.encoder.scale"].item() != 1.0
    gif_path = V.prompt_to_gif(latest, "seven moving up", tmp_path / "prompt.gif", frames=4, modality_steps=2)
    with Image.open(gif_path) as gif:
        assert gif.n_frames == 4

    script.main(
        parse([*TINY, "--data-dir", str(data), "--steps", "3", "--min-frames", "4", "--out", str(out), "--resume", "latest", "--text-loss-weight", "2.5"])
    )
    assert read_checkpoint(latest)["step"] == 3
    resumed = read_checkpoint(latest)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in fitted.items())  # the autoencoder came from the checkpoint: not refitted, not trained
    train_steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss/total" in row]
    assert train_steps == [1, 2, 3]  # continued at step 3, nothing repeated

    evaluated = script.main(parse([*TINY, "--data-dir", str(data), "--out", str(tmp_path / "eval"), "--eval-only", str(latest), "--eval-frames", "6"]))
    assert evaluated["step"] == 3 and evaluated["eval_frames"] == 6


def test_main_trains_with_either_optimizer_and_resumes_only_with_its_own(tmp_path):
    """The default optimizer is Muon: the checkpoint holds a momentum buffer per hidden matrix,
    `--resume` continues it, and resuming it with `--optimizer adamw` is refused, naming the flag.
    `--optimizer adamw` keeps AdamW's moments for every parameter, and Muon cannot resume those."""
    script = load_script()
    data = tiny_digits(tmp_path)
    parse = script.build_parser().parse_args
    for optimizer, other in (("muon", "adamw"), ("adamw", "muon")):
        out = tmp_path / optimizer
        flags = [*TINY, "--data-dir", str(data), "--out", str(out), "--eval-samples", "4"]
        chosen = [] if optimizer == "muon" else ["--optimizer", "adamw"]  # the default is Muon
        script.main(parse([*flags, "--steps", "2", *chosen]))
        latest = out / "checkpoints" / "latest.pt"
        state = read_checkpoint(latest)["optimizer"]["state"]
        buffers = sum("momentum_buffer" in s for s in state.values())
        assert buffers == (4 if optimizer == "muon" else 0)  # depth 1: qkv, out, ff in, ff out
        assert sum("exp_avg" in s for s in state.values()) == len(state) - buffers
        with pytest.raises(ValueError, match=f"`--optimizer {other}` cannot resume"):
            script.main(parse([*flags, "--steps", "3", "--resume", "latest", "--optimizer", other]))
        script.main(parse([*flags, "--steps", "3", "--resume", "latest", *chosen]))
        assert read_checkpoint(latest)["step"] == 3


def test_main_with_the_patchify_codec_and_warped_digits(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    script = load_script()
    out = tmp_path / "run"
    clips, masks = V.MovingDigits.clips, []
    monkeypatch.setattr(V.MovingDigits, "clips", lambda self, indices, epoch, warp=None: masks.append(warp) or clips(self, indices, epoch, warp))
    flags = [*TINY, "--data-dir", str(tiny_digits(tmp_path)), "--steps", "3", "--codec", "patchify", "--out", str(out), "--warp", "all"]
    args = script.build_parser().parse_args(flags)
    report = script.main(args)
    assert args.flow_prediction == "data" and report["step"] == 3 and 0.0 <= report["digit_accuracy"] <= 1.0
    assert len(masks) == 3 and all(mask.dtype == torch.bool and mask.all() for mask in masks)  # every training clip warped
    masks.clear()
    script.main(script.build_parser().parse_args([*flags[:-1], "captions", "--caption-fraction", "0.5", "--out", str(tmp_path / "captions")]))
    assert len(masks) == 3 and 0 < sum(int(mask.sum()) for mask in masks) < 12  # only the clips before a caption
    sampler = V.load_sampler(out / "checkpoints" / "latest.pt")
    assert isinstance(sampler.modality_heads[0].encoder, VideoPatchify) and sampler.config["dim_latent"] == 2 * 4 * 4


def test_main_trains_eager_without_a_cpp_compiler(monkeypatch, capsys):
    """`--compile` is on by default; on a CPU without a C++ compiler the script says so and trains eager."""
    script = load_script()
    args = script.build_parser().parse_args(["--frames", "7", "--device", "cpu"])
    assert args.compile and not script.build_parser().parse_args(["--no-compile"]).compile
    monkeypatch.setattr(script, "compiler_available", lambda device: False)
    with pytest.raises(ValueError, match="--frames"):  # stops before any training, after the check
        script.main(args)
    assert not args.compile and "training eager" in capsys.readouterr().out
    monkeypatch.setattr(script, "compiler_available", lambda device: True)
    args = script.build_parser().parse_args(["--frames", "7", "--device", "cpu"])
    with pytest.raises(ValueError, match="--frames"):
        script.main(args)
    assert args.compile


def test_compiler_available(monkeypatch):
    from transfusion_pytorch import training

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    assert not training.compiler_available(torch.device("cpu")) and training.compiler_available(torch.device("cuda"))
    monkeypatch.setenv("CXX", "my-c++")
    monkeypatch.setattr(training.shutil, "which", lambda name: "/opt/bin/my-c++" if name == "my-c++" else None)
    assert training.compiler_available(torch.device("cpu"))


def test_main_refuses_bad_frame_counts():
    script = load_script()
    parse = script.build_parser().parse_args
    with pytest.raises(ValueError, match="--frames"):
        script.main(parse(["--frames", "7", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--min-frames"):
        script.main(parse(["--min-frames", "10", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--patch-size"):
        script.main(parse(["--patch-size", "2", "--device", "cpu"]))  # the autoencoder's tokens are 4, 8, 16 or 32 pixels a side
    with pytest.raises(ValueError, match="--stem conv"):
        script.main(parse(["--stem", "conv", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--ae-lr"):
        script.main(parse(["--ae-lr", "0", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--ae-batch-size"):
        script.main(parse(["--ae-batch-size", "0", "--device", "cpu"]))
