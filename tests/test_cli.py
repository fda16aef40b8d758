"""`sparkles chat`: one-shot answers, JSON, the REPL, and user errors as one line with exit status 2."""

import json
import subprocess
import sys

import pytest
from PIL import Image as PILImage

from sparkles.cli import main


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        path = tmp_path / f"p{i}.png"
        PILImage.new("RGB", (50 + 10 * i, 40), color).save(path)
        paths.append(str(path))
    return paths


def test_one_shot_answer_prints_text(photos, capsys):
    assert main(["chat", "--model", "tiny", "--image", photos[0], "--image", photos[1],
                 "Compare IMAGE#1 with IMAGE#2.", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "untrained" in err  # the tiny model says it is untrained


def test_json_output_lists_the_images_by_name(photos, capsys):
    assert main(["chat", "--json", "--image", photos[0], "--image", photos[1], "<image> vs <image>",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["answer"], str)
    assert [i["name"] for i in result["images"]] == ["IMAGE#1", "IMAGE#2"]
    assert result["images"][0]["source"] == photos[0] and len(result["images"][0]["sha256"]) == 64


def test_a_checkpoint_folder_is_a_model(tiny, photos, tmp_path, capsys):
    from sparkles.model.checkpoint import save_checkpoint

    save_checkpoint(*tiny, tmp_path / "ck")
    assert main(["chat", "--model", str(tmp_path / "ck"), "--image", photos[0], "Describe IMAGE#1",
                 "--max-new-tokens", "3"]) == 0
    assert "untrained" not in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "missing.png", "hi"], "error: image file not found: missing.png"),
    (["--image", "{bad}", "hi"], "error: cannot read image"),
    (["--image", "{p0}", "--image", "{p1}", "IMAGE#5 or IMAGE#1?"],
     "error: IMAGE#5 is not an image of this conversation (images: IMAGE#1, IMAGE#2)"),
    (["--image", "{p0}", "<image> <image>"], "error: the prompt has 2 <image> placeholders but 1 new images"),
    (["word " * 3000], "error: the conversation is"),
    (["--model", "no/such/folder", "hi"], "error: no checkpoint folder at no/such/folder"),
    (["--temperature", "-1", "hi"], "error: temperature must be >= 0"),
    (["--seed", "18446744073709551616", "--temperature", "1", "hi"], "error: seed must be an integer in"),
    (["--temperature", "nan", "hi"], "error: temperature, top_p and repetition_penalty must be finite"),
    (["--repetition-penalty", "1e300", "--temperature", "1", "hi"], "error: repetition_penalty must be in (0, 10]"),
    (["--max-new-tokens", "0", "hi"], "error: max_new_tokens must be >= 1"),
    (["--stop", "", "hi"], "error: each stop string must have 1 to 256 characters"),
    (["--stop", "x" * 257, "hi"], "error: each stop string must have 1 to 256 characters"),
    (["--device", "banana", "hi"], "error: --device 'banana' is not a device"),
    ([""], "error: the prompt is empty"),
    (["   "], "error: the prompt is empty"),
    (["caf\udce9?"], "error: the prompt is not valid UTF-8 text: b'\\xe9' at character 3"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, photos, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    args = [a.format(p0=photos[0], p1=photos[1], bad=bad) for a in args]
    assert main(["chat", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert "Traceback" not in err


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparkles.cli", "chat", "--image", str(tmp_path / "nope.jpg"),
                             "hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: image file not found: {tmp_path / 'nope.jpg'}"


def test_repl_adds_images_mid_dialogue_and_survives_bad_lines(photos, monkeypatch, capsys):
    lines = iter([f"/image {photos[0]}", "What is in IMAGE#1?", f"/image {photos[1]}",
                  "IMAGE#9 please", "Compare IMAGE#1 with IMAGE#2.", "/image", "/frobnicate", "/reset",
                  "IMAGE#1?", f"/image {photos[2]}", "<image> now", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert f"IMAGE#1: {photos[0]}" in out and f"IMAGE#2: {photos[1]}" in out
    assert "error: IMAGE#9 is not an image of this conversation (images: IMAGE#1, IMAGE#2)" in err
    assert "error: /image needs a path" in err and "error: unknown command /frobnicate" in err
    # After /reset the old images are gone, and the next image is IMAGE#1 again.
    assert "error: IMAGE#1 is not an image of this conversation (images: none)" in err
    assert f"IMAGE#1: {photos[2]}" in out
    assert next(lines) == "never read"


def test_repl_undoes_and_retries_turns(photos, monkeypatch, capsys):
    lines = iter([f"/image {photos[0]}", "What is in IMAGE#1?", "/retry", "/undo", "/undo", "/retry",
                  "IMAGE#1 again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "(forgot: What is in IMAGE#1?)" in out
    assert err.count("error: there is no finished turn to undo") == 2
    # The undone turn's image waits for the next message, still IMAGE#1.
    assert "error: IMAGE#1 is not an image" not in err
    assert out.split("(forgot: What is in IMAGE#1?)")[1].strip()  # and "IMAGE#1 again?" was answered


def test_repl_ends_on_end_of_input(monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert main(["chat"]) == 0


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "chat" in capsys.readouterr().out



DIALOGUE = {"dialogue": [
    {"role": "user", "content": "Compare IMAGE#812<Img><ImageHere></Img> with IMAGE#77<Img><ImageHere></Img>.",
     "images": [{"image_id": "812", "caption": "lanterns"}, {"image_id": "77", "caption": "a band"}]},
    {"role": "assistant", "content": "IMAGE#812 glows."},
    {"role": "user", "content": "And IMAGE#5120<Img><ImageHere></Img>?", "images": [{"image_id": "5120"}]},
    {"role": "assistant", "content": "A harbour."}]}


def test_render_shows_loss_and_image_positions(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(DIALOGUE) + "\n")
    assert main(["render", str(path), "--loss-on", "last"]) == 0
    out = capsys.readouterr().out
    assert "IMAGE#812<Img>⟨image 1 × 16 at" in out and "⟦ A harbour.###⟧" in out
    assert "⟦ IMAGE#812 glows." not in out
    assert "3 images × 16 tokens" in out


def test_render_names_a_broken_line(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(DIALOGUE) + "\n{broken\n")
    assert main(["render", str(path), "--index", "1"]) == 2
    assert "d.jsonl, record 1: line 2 is not valid JSON" in capsys.readouterr().err


def test_a_tiny_temperature_is_greedy(capsys):
    answers = []
    for temperature in ("0", "1e-300"):
        assert main(["chat", "hi", "--max-new-tokens", "6", "--temperature", temperature, "--seed", "1"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_a_device_this_machine_lacks_is_one_error_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this test needs a machine without CUDA: it asks for the device the machine lacks")
    assert main(["chat", "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda asks for CUDA, but this machine has no CUDA GPU"), err
    assert "Traceback" not in err


def test_the_repl_refuses_a_line_that_is_not_utf8_and_goes_on(monkeypatch, capsys):
    lines = iter(["caf\udce9?", "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "error: this line is not valid UTF-8 text: b'\\xe9' at character 3" in err and "Traceback" not in err
    assert next(lines, "all read") == "all read"


def test_the_installed_command_refuses_a_prompt_of_bytes_that_are_not_utf8():
    import os

    result = subprocess.run([sys.executable.encode(), b"-m", b"sparkles.cli", b"chat", b"caf\xe9?"],
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONUTF8": "1"})
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert result.stderr.strip().endswith(b"error: the prompt is not valid UTF-8 text: b'\\xe9' at character 3")
