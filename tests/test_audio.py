"""The audio example: eSpeak NG words, the log-mel codec, the LibriSpeech reader, text ↔ speech
training in both orders, and `train_audio.main` end to end (checkpoint, WAVs, eval.json, resume,
the demo's load / speak / caption helpers)."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion_pytorch import BucketBatchSampler, Transfusion, collate_fn
from transfusion_pytorch.examples.audio import (
    NUM_TEXT_TOKENS,
    SAMPLE_RATE,
    LogMelCodec,
    caption_latents,
    decode_caption,
    encode_caption,
    generate_latents,
    librispeech_split,
    load_audio_model,
    load_spoken_words,
    pairs,
    read_librispeech,
    speech_to_text,
    synthesize,
    text_to_speech,
    word_accuracy,
)
from transfusion_pytorch.training import native_amp, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
soundfile = pytest.importorskip("soundfile")


def load_script():
    spec = importlib.util.spec_from_file_location("train_audio", ROOT / "train_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """Two words in every voice, rate and pitch (270 clips, about a second to synthesise)."""
    return load_spoken_words(tmp_path_factory.mktemp("spoken"), words=("zero", "one"))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_captions_and_word_accuracy():
    for text in ("seven", "don't stop", "x"):
        ids = encode_caption(text)
        assert ids.dtype == torch.long and int(ids.max()) < NUM_TEXT_TOKENS
        assert decode_caption(ids) == text
    assert decode_caption(torch.tensor([*encode_caption("six").tolist(), NUM_TEXT_TOKENS + 1, 0])) == "six"
    with pytest.raises(ValueError, match="text"):
        encode_caption("Seven")
    with pytest.raises(TypeError, match="text"):
        encode_caption(7)
    assert word_accuracy("seven", "seven") == 1.0 and word_accuracy("seven", "seve") == 0.0
    assert word_accuracy("the cat sat", "the cat sat") == 1.0
    assert word_accuracy("the cat sat", "the bat sat") == pytest.approx(2 / 3)
    assert word_accuracy("the cat sat", "the cat") == pytest.approx(2 / 3)
    assert word_accuracy("a b", "x y z w") == 0.0  # floored


def test_synthesis_voices_and_held_out_split(words):
    wave = synthesize("seven", "en-us+f2", rate=175, pitch=50)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 * SAMPLE_RATE < len(wave) < 1.0 * SAMPLE_RATE  # one word, silence trimmed
    assert np.abs(wave).max() == pytest.approx(0.9, abs=1e-3)
    slow = synthesize("seven", "en-us+f2", rate=120, pitch=50)
    assert len(slow) > 1.2 * len(wave)  # rate is words per minute
    other = synthesize("seven", "en+m4", rate=175, pitch=50)
    assert len(other) != len(wave) or not np.allclose(other, wave)
    with pytest.raises(ValueError, match="voice"):
        synthesize("seven", "no-such-voice")
    with pytest.raises(ValueError, match="rate"):
        synthesize("seven", rate=10)

    # held-out voices are whole voices: none of them speaks in the training set
    assert len(words.train_waves) == 12 * 2 * 9 and len(words.eval_waves) == 3 * 2 * 9
    assert words.train_labels.bincount().tolist() == [108, 108] and set(words.eval_texts) == {"zero", "one"}
    assert not set(words.eval_voices) & {"en-us+m1", "en+m4"}
    with pytest.raises(ValueError, match="eval_voices"):
        load_spoken_words(None, words=("zero",), train_voices=("en-us+m1",), eval_voices=("en-us+m1",))


def test_codec_round_trip_on_variable_lengths(words):
    codec = LogMelCodec().fit(words.train_waves[::4])
    waves = [words.eval_waves[0], words.eval_waves[-1], synthesize("seven", "en-us+m5", 140, 50), synthesize("no", "en-us+m5", 210, 50)]
    lengths = [len(w) for w in waves]
    assert len(set(lengths)) == len(lengths)
    for wave in waves:
        latent = codec.encode(wave)
        assert latent.shape == (int(np.ceil(len(wave) / codec.samples_per_token)), codec.dim_latent)  # length follows the clip
        assert abs(float(latent.mean())) < 1.0  # normalised
        decoded = codec.decode(latent)
        assert decoded.shape == (latent.shape[0] * codec.samples_per_token,)
        again = codec.encode(decoded)
        assert again.shape == latent.shape
        # the spectrogram survives the mel inversion and Griffin-Lim: far closer to its own clip than to another word's
        assert correlation(again, latent) > 0.9
    seven, no = codec.encode(waves[2]), codec.encode(waves[3])
    n = min(len(seven), len(no))
    assert correlation(seven[:n], no[:n]) < 0.85
    restored = LogMelCodec.from_state(codec.state())
    assert torch.equal(restored.encode(waves[0]), codec.encode(waves[0]))
    with pytest.raises(ValueError, match="latent"):
        codec.decode(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="wave"):
        codec.encode(np.zeros((2, 100), dtype=np.float32))


def test_tts_and_stt_forward_backward_on_variable_lengths():
    torch.manual_seed(0)
    dim_latent, texts = 16, ["zero", "one", "two", "three", "four", "five"]
    latents = [torch.randn(n, dim_latent) for n in (5, 9, 6, 12, 7, 9)]
    model = Transfusion(
        num_text_tokens=NUM_TEXT_TOKENS,
        dim_latent=dim_latent,
        modality_default_shape=(8,),
        add_pos_emb=True,
        unconditional_prob=0.1,
        transformer=dict(dim=32, depth=1, dim_head=16, heads=2),
    )
    lengths = model.token_lengths(pairs(latents, texts, [False] * 6))
    # 7 more audio tokens, one more caption letter ("three" vs "zero"), one more digit in the shape ("12" vs "5")
    assert lengths[3] - lengths[0] == 7 + 1 + 1
    sampler = BucketBatchSampler(lengths, batch_size=3, seed=0, drop_last=True)
    for index in sampler:
        batch = collate_fn([pairs([latents[i]], [texts[i]], [j % 2 == 0])[0] for j, i in enumerate(index)])
        loss, breakdown = model(batch, return_breakdown=True)  # speech → text and text → speech in one batch
        assert torch.isfinite(loss) and breakdown.text > 0 and breakdown.flow[0] > 0
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert any("to_text_logits" in n or "text" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.eval()
    spoken = generate_latents(model, ["one", "two"], modality_steps=2, max_tokens=16)
    assert all(x is None or (x.ndim == 2 and x.shape[1] == dim_latent) for x in spoken)
    captions = caption_latents(model, latents[:2], max_length=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def write_librispeech(root: Path):
    """speaker/chapter/*.flac + speaker-chapter.trans.txt, two speakers, one at 8 kHz in stereo."""
    rng = np.random.default_rng(0)
    for speaker, chapter, rate, channels, lines in (
        ("19", "198", 16000, 1, [("0000", "HELLO WORLD"), ("0001", "IT'S A TEST")]),
        ("26", "495", 8000, 2, [("0000", "GOOD MORNING, SIR")]),
    ):
        folder = root / speaker / chapter
        folder.mkdir(parents=True)
        transcript = []
        for number, text in lines:
            utterance = f"{speaker}-{chapter}-{number}"
            audio = (0.1 * rng.standard_normal((rate // 2, channels))).astype(np.float32)
            soundfile.write(folder / f"{utterance}.flac", audio, rate)
            transcript.append(f"{utterance} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(transcript) + "\n")


def test_librispeech_reader_on_a_fixture(tmp_path):
    write_librispeech(tmp_path)
    utterances = read_librispeech(tmp_path)
    assert [u["id"] for u in utterances] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert [u["text"] for u in utterances] == ["hello world", "it's a test", "good morning sir"]
    for u in utterances:
        assert u["wave"].dtype == np.float32 and u["wave"].ndim == 1
        assert len(u["wave"]) == SAMPLE_RATE // 2  # 8 kHz stereo resampled to 16 kHz mono
    split = librispeech_split(tmp_path)
    assert split.train_texts == ["hello world", "it's a test"] and split.eval_texts == ["good morning sir"]
    assert split.eval_voices == ["26"]
    assert read_librispeech(tmp_path, max_seconds=0.25) == []
    (tmp_path / "19" / "198" / "19-198-0001.flac").unlink()
    with pytest.raises(ValueError, match="19-198-0001"):
        read_librispeech(tmp_path)
    with pytest.raises(ValueError, match="root"):
        read_librispeech(tmp_path / "19" / "198" / "nothing")


def tiny_args(out: Path, cache: Path, **overrides) -> argparse.Namespace:
    args = load_script().build_parser().parse_args([])
    values = dict(
        steps=4, batch_size=8, warmup=2, dim=32, depth=1, heads=2, num_words=2, eval_samples=1, eval_captions=6,
        classifier_epochs=1, checkpoint_every=2, threads=1, device="cpu", out=str(out), cache_dir=str(cache), modality_steps=2,
    )  # fmt: skip
    values.update(overrides)
    for key, value in values.items():
        setattr(args, key.replace("-", "_"), value)
    return args


def test_train_audio_tiny_run_resume_and_demo_helpers(tmp_path, words):
    script = load_script()
    cache = tmp_path / "cache"
    report = script.main(tiny_args(tmp_path / "run", cache))
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "latest.pt"
    assert checkpoint.is_file() and (out / "metrics.jsonl").is_file() and (out / "spectrogram.png").is_file()
    saved = json.loads((out / "eval.json").read_text())
    for key in ("stt_word_accuracy", "tts_intelligibility", "classifier_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["step"] == 4 and report["stt_word_accuracy"] == saved["stt_word_accuracy"]
    assert saved["train_precision"] == ("bf16" if native_amp("cpu") else "fp32")  # the default follows the CPU
    wavs = sorted(out.glob("samples/*.wav"))
    assert wavs and {p.stem for p in wavs} <= {"zero", "one"}
    audio, rate = soundfile.read(wavs[0])
    assert rate == SAMPLE_RATE and audio.ndim == 1 and len(audio) > 0
    payload = read_checkpoint(checkpoint)
    assert payload["step"] == 4 and payload["extra"]["codec"]["num_mels"] == 64

    # resume: 2 steps, then 2 more from the checkpoint == 4 straight
    half = tiny_args(tmp_path / "half", cache, steps=2)
    script.main(half)
    script.main(tiny_args(tmp_path / "half", cache, resume="latest"))
    straight, resumed = (read_checkpoint(p / "checkpoints" / "latest.pt")["model"] for p in (out, tmp_path / "half"))
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name

    # --eval-only reads the checkpoint back; the demo's helpers load it, speak and caption
    again = script.main(tiny_args(tmp_path / "eval", cache, eval_only=str(checkpoint)))
    assert again["step"] == 4
    model, codec = load_audio_model(checkpoint)
    wave, rate = text_to_speech(model, codec, "one", cfg_scale=2.0, steps=2, seed=0)
    assert rate == SAMPLE_RATE and wave.ndim == 1 and len(wave) % codec.samples_per_token == 0
    caption = speech_to_text(model, codec, np.repeat(words.eval_waves[0], 2)[::2], sample_rate=SAMPLE_RATE)
    assert isinstance(caption, str)
    with pytest.raises(ValueError, match="text"):
        text_to_speech(model, codec, "Hello!")


@pytest.mark.slow
def test_train_audio_under_torchrun_with_ddp(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    flags = f"--ddp --steps 2 --batch-size 8 --num-words 2 --dim 32 --depth 1 --heads 2 --eval-samples 1 --eval-captions 4 --classifier-epochs 1 --threads 1 --modality-steps 2 --device cpu --out {out} --cache-dir {tmp_path / 'cache'}"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "train_audio.py", *flags.split()], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes × 4 samples = global batch 8" in result.stdout
    assert read_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 2
    assert json.loads((out / "eval.json").read_text())["step"] == 2 and list(out.glob("samples/*.wav"))
