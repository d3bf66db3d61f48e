"""demo.py: the model behind the page, its two API endpoints through `gradio_client`, the
command line, and the page itself in a real headless browser (Playwright driving Debian's
`chromium`). One tiny train_mnist.py checkpoint (random weights) and one app launch serve them
all; tiny train_video.py and train_audio.py checkpoints check the tabs those get."""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, randomized

gradio = pytest.importorskip("gradio")  # the `demo` extra (scripts/setup.sh installs it)
gradio_client = pytest.importorskip("gradio_client")
from PIL import Image, ImageDraw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # demo.py and train_mnist.py are scripts at the repository root

import demo  # noqa: E402
import train_mnist  # noqa: E402
from transfusion_pytorch.examples.mnist import DIGIT_WORDS  # noqa: E402
from transfusion_pytorch.training import save_checkpoint  # noqa: E402

TINY = "--dim 32 --depth 1 --heads 2".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A train_mnist.py model, tiny, with randomised weights, saved the way train_mnist.py saves it."""
    args = train_mnist.build_parser().parse_args(TINY)
    torch.manual_seed(0)
    model = randomized(train_mnist.build_model(args))
    path = tmp_path_factory.mktemp("demo") / "checkpoints" / "latest.pt"
    return save_checkpoint(path, model, ema=model.create_ema(), step=7, extra={"args": json.dumps(vars(args))})


@pytest.fixture(scope="module")
def digit_demo(checkpoint) -> demo.DigitDemo:
    return demo.load_demo(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(digit_demo):
    app = demo.launch(demo.build_app(digit_demo), port=None, block=False)  # the first free port from 7860
    yield app.local_url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def digit_png(path: Path, size=(300, 200), ink=(20, 20, 160), paper=(250, 245, 235)) -> Path:
    """A photo-like digit: a dark stroke on light paper, far from MNIST's 28×28 white on black."""
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(150, 30), (150, 170)], fill=ink, width=14)  # a "1"
    draw.line([(150, 30), (120, 60)], fill=ink, width=14)
    image.save(path)
    return path


# ------------------------------------------------------------------ the model behind the page


def test_prompts_name_one_digit():
    assert demo.parse_digit("seven") == 7 and demo.parse_digit(" 7 ") == 7 and demo.parse_digit("A Zero, please.") == 0
    for bad, match in [("", "empty"), ("   ", "empty"), ("seventy", "one digit"), ("1 or 2", "one digit"), ("x" * 101, "100"), (None, "text")]:
        with pytest.raises(ValueError, match=match) as error:
            demo.parse_digit(bad)
        assert "`prompt`" in str(error.value)
    for name, value in [("steps", 0), ("steps", 65), ("steps", 2.5), ("cfg_scale", float("nan")), ("seed", -1), ("num_images", True)]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            demo.check_number(name, value, integer=name != "cfg_scale")


def test_uploads_become_mnist_digits(tmp_path):
    pixels = demo.to_digit_pixels(Image.open(digit_png(tmp_path / "one.png")))
    assert pixels.shape == (1, 28, 28) and pixels.dtype == torch.float32
    grey = (pixels[0] + 1) * 127.5
    assert grey.min() == 0 and grey.max() == 255  # light paper → black background, dark ink → white
    rows, cols = (grey > 64).nonzero(as_tuple=True)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21  # the ink boxed to 20×20 (±1 for antialiasing)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = torch.stack(((ys * grey).sum(), (xs * grey).sum())) / grey.sum()
    assert torch.allclose(centre, torch.tensor([13.5, 13.5]), atol=1.0)  # centred by its centre of mass

    # the same strokes on a transparent background, and an MNIST digit as it comes (28×28, white on black)
    rgba = Image.open(tmp_path / "one.png").convert("RGBA")
    alpha = Image.fromarray(((np.asarray(rgba.convert("L")) < 128) * 255).astype(np.uint8))
    rgba.putalpha(alpha)
    assert torch.allclose(demo.to_digit_pixels(rgba), pixels, atol=0.2)
    mnist = np.zeros((28, 28), dtype=np.uint8)
    mnist[6:22, 12:16] = 255
    assert torch.equal(demo.to_digit_pixels(Image.fromarray(mnist)), torch.tensor(mnist, dtype=torch.float32)[None] / 127.5 - 1)


def test_image_files_are_checked(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "huge.bmp").write_bytes(b"\0" * (demo.MAX_UPLOAD_BYTES + 1))
    Image.new("L", (demo.MAX_IMAGE_SIDE + 1, 1)).save(tmp_path / "wide.png")
    for name, match in [
        ("notes.png", "not a readable image"),
        ("huge.bmp", "limit is 5 MB"),
        ("wide.png", "pixels; the limit"),
        ("absent.png", "did not arrive"),
    ]:
        with pytest.raises(ValueError, match=match):
            demo.read_image(tmp_path / name)


def test_seeds_not_batch_size_fix_each_image(digit_demo):
    four = digit_demo.text_to_image("three", cfg_scale=3.0, steps=4, seed=11, num_images=4)
    assert four.images.shape == (4, 28, 28) and four.images.dtype == np.uint8
    assert np.array_equal(digit_demo.text_to_image("3", 3.0, 4, 11, 1).images[0], four.images[0])
    assert not np.array_equal(four.images[0], four.images[1])
    assert four.sample_text.count("[sos] t h r e e [meta] '7,7' [som]") == 4 and "modality:0   (1, 28, 28)" in four.sample_text


# ------------------------------------------------------------------ the API endpoints


def test_api_lists_exactly_the_two_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert sorted(endpoints) == ["/image_to_text", "/text_to_image"]
    assert [p["parameter_name"] for p in endpoints["/text_to_image"]["parameters"]] == ["prompt", "cfg_scale", "steps", "seed"]
    assert [p["parameter_has_default"] for p in endpoints["/text_to_image"]["parameters"]] == [True, True, True, True]


def test_text_to_image_and_back(client, digit_demo, tmp_path):
    path = client.predict("seven", 2.0, 4, 3, api_name="/text_to_image")
    image = Image.open(path)
    assert image.size == (28, 28) and image.mode == "L"
    assert np.array_equal(np.asarray(image), digit_demo.text_to_image("seven", 2.0, 4, 3).images[0])
    default = Image.open(client.predict("7", api_name="/text_to_image"))  # cfg_scale, steps and seed have defaults
    assert np.array_equal(np.asarray(default), digit_demo.text_to_image("7", *(demo.LIMITS[k][2] for k in ("cfg_scale", "steps", "seed"))).images[0])

    upload = digit_png(tmp_path / "one.png")
    caption = client.predict(gradio_client.handle_file(str(upload)), api_name="/image_to_text")
    assert isinstance(caption, str) and caption == digit_demo.image_to_text(Image.open(upload)).caption
    assert client.predict(gradio_client.handle_file(path), api_name="/image_to_text") == digit_demo.image_to_text(image).caption


def test_bad_input_answers_with_a_message(client, tmp_path):
    for arguments, match in [
        (("",), "prompt` is empty"),
        (("seven", 3.0, 500), "steps` must be from 2 to 64"),
        (("seven", 3.0, 2.5), "steps` must be a whole number"),
        (("seven", 3.0, 16, -4), "seed` must be from 0"),
        (("seven", 11), "cfg_scale` must be from 1.0 to 10.0"),
    ]:
        with pytest.raises(gradio_client.exceptions.AppError, match=match):
            client.predict(*arguments, api_name="/text_to_image")
    (tmp_path / "digit.png").write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="not a readable image"):
        client.predict(gradio_client.handle_file(str(tmp_path / "digit.png")), api_name="/image_to_text")
    (tmp_path / "big.png").write_bytes(b"\0" * (demo.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(Exception, match="(?i)size|413|large"):  # refused by the upload route before it is stored
        client.predict(gradio_client.handle_file(str(tmp_path / "big.png")), api_name="/image_to_text")


def test_only_uploaded_files_are_read(server, tmp_path):
    """A request naming a file on the server that nobody uploaded is refused before the function runs."""
    import httpx

    readable = digit_png(tmp_path / "on_the_server.png")
    for path in (str(readable), "/etc/hostname"):
        call = httpx.post(f"{server}gradio_api/call/image_to_text", json={"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}]})
        stream = httpx.get(f"{server}gradio_api/call/image_to_text/{call.json()['event_id']}", timeout=60).text
        assert stream.startswith("event: error") and "complete" not in stream
    assert httpx.get(f"{server}gradio_api/file={readable}").status_code == 403


def test_twenty_concurrent_requests_each_get_their_own_answer(client, digit_demo, tmp_path):
    prompts = [(str(k % 10) if k % 2 else DIGIT_WORDS[k % 10], 1.0 + k % 3, 2 + k % 3, 100 + k) for k in range(10)]
    uploads = [tmp_path / f"upload{k}.png" for k in range(10)]
    for k, path in enumerate(uploads):
        Image.fromarray(digit_demo.text_to_image(str(k), 3.0, 2, k).images[0]).save(path)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        images = [pool.submit(client.predict, *p, api_name="/text_to_image") for p in prompts]
        captions = [pool.submit(client.predict, gradio_client.handle_file(str(u)), api_name="/image_to_text") for u in uploads]
        images, captions = [f.result(timeout=300) for f in images], [f.result(timeout=300) for f in captions]
    for p, path in zip(prompts, images):
        assert np.array_equal(np.asarray(Image.open(path)), digit_demo.text_to_image(*p).images[0])
    assert captions == [digit_demo.image_to_text(Image.open(u)).caption for u in uploads]


# ------------------------------------------------------------------ the command line


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--checkpoint", str(tmp_path / "none.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "bash scripts/main.sh" in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a transfusion_pytorch checkpoint"):
        demo.main(demo.build_parser().parse_args(["--checkpoint", str(tmp_path / "broken.pt")]))


# ------------------------------------------------------------------ the page, in a real browser


def chromium_or_skip() -> str:
    """Debian's chromium (CI installs it); outside CI a machine without it skips the browser test."""
    pytest.importorskip("playwright")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Debian's chromium in CI: apt-get install chromium")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return executable


def test_the_page_in_a_browser(server, digit_demo, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_or_skip()
    upload = digit_png(tmp_path / "one.png")
    expected_caption = digit_demo.image_to_text(Image.open(upload)).caption or "(the model wrote no letters)"
    requested = []
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
    ]
    with sync_playwright() as playwright:
        # launch_persistent_context passes --user-data-dir (a fresh folder) and --headless itself
        browser = playwright.chromium.launch_persistent_context(tmp_path / "profile", executable_path=executable, headless=True, args=flags)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server)

            page.get_by_label("Prompt: a digit in words or figures").fill("two")
            page.locator("#generate").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=60_000)
            expect(page.locator("#generated-sample textarea")).to_have_value(re.compile(r"\[sos\] t w o \[meta\] '7,7' \[som\]"), timeout=30_000)

            page.get_by_label("Prompt: a digit in words or figures").fill("")
            page.locator("#generate").click()
            expect(page.get_by_text("`prompt` is empty").first).to_be_visible(timeout=30_000)  # gr.Error, shown in the page

            page.get_by_role("tab", name="Image → text").click()
            page.locator("input[type=file]").first.set_input_files(str(upload))
            page.locator("#caption-button").click()
            expect(page.locator("#caption textarea")).to_have_value(expected_caption, timeout=60_000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            (tmp_path / "notes.png").write_text("not an image")
            (tmp_path / "big.png").write_bytes(b"\0" * (demo.MAX_UPLOAD_BYTES + 1))
            for bad, message in [("notes.png", "`image` is not a readable image file"), ("big.png", "exceed the maximum allowed size of 5.0 Mb")]:
                page.reload()
                page.get_by_role("tab", name="Image → text").click()
                page.locator("input[type=file]").first.set_input_files(str(tmp_path / bad))
                page.locator("#caption-button").click()
                expect(page.get_by_text(message).first).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 0
    outside = [url for url in requested if not url.startswith((server.rstrip("/"), "data:", "blob:"))]
    assert outside == [], f"the page fetched from outside the app: {outside[:5]}"


# ------------------------------------------------------------------ other checkpoints


def test_a_video_checkpoint_gets_a_text_to_video_tab(tmp_path):
    import train_video

    args = train_video.build_parser().parse_args([*TINY, "--frames", "4", "--frame-patch-size", "2"])
    torch.manual_seed(0)
    model = randomized(train_video.build_model(args))
    path = save_checkpoint(tmp_path / "video.pt", model, ema=model.create_ema(), extra={"args": json.dumps(vars(args))})
    video_demo = demo.load_demo(path, device="cpu")
    assert isinstance(video_demo, demo.VideoDemo)

    clip = video_demo.text_to_video(" Three moving LEFT ", cfg_scale=2.0, steps=2, seed=5)
    assert clip.video.shape == (1, 1, 4, 32, 32)  # the trained length by default
    assert "t h r e e ␣ m o v i n g ␣ l e f t [meta] '2,8,8' [som]" in clip.sample_text
    assert torch.equal(video_demo.text_to_video("three moving left", 2.0, 2, 5).video, clip.video)
    assert not torch.equal(video_demo.text_to_video("three moving left", 2.0, 2, 6).video, clip.video)
    assert video_demo.text_to_video("three moving up", 2.0, 2, 5, frames=6).video.shape == (1, 1, 6, 32, 32)
    for prompt, frames, match in [
        ("three moving sideways", None, "`prompt` must read"),
        ("", None, "`prompt` is empty"),
        ("one moving up", 3, "`frames` must be a multiple of 2"),
    ]:
        with pytest.raises(ValueError, match=match):
            video_demo.text_to_video(prompt, 2.0, 2, 0, frames)

    app = demo.launch(demo.build_app(video_demo), port=None, block=False)
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/text_to_video"]
        gif = Image.open(client.predict("three moving left", 2.0, 2, 5, api_name="/text_to_video"))
        assert gif.format == "GIF" and gif.n_frames == 4
        with pytest.raises(gradio_client.exceptions.AppError, match="`prompt` must read"):
            client.predict("seven", api_name="/text_to_video")
    finally:
        app.close()


def test_checkpoints_without_a_tab_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "toy.pt", make_model(dim_latent=(4, 6), modality_default_shape=((2,), (2, 2))))
    with pytest.raises(ValueError, match="demo.py serves checkpoints of train_mnist.py, train_video.py and train_audio.py"):
        demo.load_demo(path, device="cpu")
    with pytest.raises(SystemExit, match="demo.py serves"):
        demo.main(demo.build_parser().parse_args(["--checkpoint", str(path)]))


def test_an_audio_checkpoint_gets_speech_tabs(tmp_path):
    """A tiny train_audio.py model, trained for 60 steps on random latents until it writes
    `[meta] "8" [som]` after a word (so that it speaks at all), through both directions."""
    import soundfile

    import train_audio
    from transfusion_pytorch.examples.audio import LogMelCodec, pairs

    args = train_audio.build_parser().parse_args([*TINY, "--num-mels", "16"])
    torch.manual_seed(0)
    codec = LogMelCodec(num_mels=16, stack=2)
    model = train_audio.build_model(args, codec, default_length=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(pairs([torch.randn(8, codec.dim_latent) for _ in range(8)], ["seven", "two", "one", "six"] * 2, [False] * 4 + [True] * 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    extra = {"args": json.dumps(vars(args)), "codec": codec.state()}
    path = save_checkpoint(tmp_path / "audio.pt", model, ema=model.create_ema(), extra=extra)
    audio_demo = demo.load_demo(path, device="cpu")
    assert isinstance(audio_demo, demo.AudioDemo)

    wave, sample_rate = audio_demo.text_to_speech(" Seven ", cfg_scale=2.0, steps=2, seed=1)
    assert sample_rate == 16_000 and wave.shape == (8 * codec.samples_per_token,) and wave.dtype == np.float32
    assert np.array_equal(audio_demo.text_to_speech("seven", 2.0, 2, 1)[0], wave)
    for prompt, match in [("seven!", "only the letters a-z"), ("", "`prompt` is empty")]:
        with pytest.raises(ValueError, match=match):
            audio_demo.text_to_speech(prompt)
    soundfile.write(tmp_path / "tone.wav", 0.3 * np.sin(np.linspace(0, 3000, 24_000)), 24_000)  # another sample rate: resampled
    soundfile.write(tmp_path / "long.wav", np.zeros(11 * 8000), 8000)
    (tmp_path / "notes.wav").write_text("not a sound")
    for name, match in [("long.wav", "lasts 11.0 s; the limit is 10 s"), ("notes.wav", "not a readable sound file")]:
        with pytest.raises(ValueError, match=match):
            demo.read_audio(tmp_path / name)
    heard = audio_demo.speech_to_text(*demo.read_audio(tmp_path / "tone.wav"))

    app = demo.launch(demo.build_app(audio_demo), port=None, block=False)
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        assert sorted(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/speech_to_text", "/text_to_speech"]
        spoken, rate = soundfile.read(client.predict("seven", 2.0, 2, 1, api_name="/text_to_speech"), dtype="float32")
        assert rate == 16_000 and np.allclose(spoken, np.clip(wave, -1, 1), atol=1 / 32_000)  # 16-bit PCM
        assert client.predict(gradio_client.handle_file(str(tmp_path / "tone.wav")), api_name="/speech_to_text") == heard
        with pytest.raises(gradio_client.exceptions.AppError, match="not a readable sound file"):
            client.predict(gradio_client.handle_file(str(tmp_path / "notes.wav")), api_name="/speech_to_text")
    finally:
        app.close()


@pytest.mark.parametrize("script_name", ["train_mnist", "train_video"])
def test_a_conv_stem_checkpoint_loads_and_serves_like_a_linear_one(tmp_path, script_name):
    """`--stem conv` records `stems.ConvStem` / `ConvHead` in the config; the demo rebuilds them."""
    import importlib

    script = importlib.import_module(script_name)
    video = script_name == "train_video"
    args = script.build_parser().parse_args(
        [*TINY, "--stem", "conv", "--stem-width", "4", *(["--frames", "4", "--frame-patch-size", "2", "--codec", "patchify"] if video else [])]
    )
    torch.manual_seed(0)
    model = randomized(script.build_model(args))
    path = save_checkpoint(tmp_path / "stem.pt", model, ema=model.create_ema(), extra={"args": json.dumps(vars(args))})
    served = demo.load_demo(path, device="cpu")
    assert type(served.model.modality_heads[0].latent_to_model).__name__ == "ConvStem"
    if video:
        assert served.text_to_video("three moving left", cfg_scale=2.0, steps=2, seed=5).video.shape == (1, 1, 4, 32, 32)
    else:
        assert served.text_to_image("seven", cfg_scale=2.0, steps=2, seed=5).images.shape[-2:] == (28, 28)
