"""Tiny random models and images for tests: built from config classes, nothing downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from sparkles.config import LanguageConfig, ModelConfig, VisionConfig  # noqa: E402
from sparkles.conversation import Image  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(**changes) -> ModelConfig:
    config = ModelConfig(
        vision=VisionConfig(kind="tiny", image_size=32, config={"patch_size": 8, "width": 32, "depth": 1, "heads": 2}),
        language=LanguageConfig(kind="tiny", config={"hidden_size": 32, "intermediate_size": 64,
                                                     "num_hidden_layers": 2, "num_attention_heads": 2,
                                                     "num_key_value_heads": 2, "max_position_embeddings": 1024}),
        connector="resampler", tokens_per_image=4, max_seq_len=1024, system_prompt="")
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.fixture
def tiny():
    """(model, processor) of a tiny random model in eval mode."""
    from sparkles.model.model import build_model

    torch.manual_seed(0)
    model, processor = build_model(tiny_config())
    return model.eval(), processor


def solid(color, size=(40, 30), sha=None) -> Image:
    """An image part holding a solid-colour picture."""
    return Image(pixels=PILImage.new("RGB", size, color), sha256=sha or f"{color}")


def steps_on_one_answer(model, processor, conversation, answer: str, *, steps: int = 4, lr: float = 1e-2,
                        check=None) -> list[float]:
    """A few AdamW steps on `conversation` answered with `answer`; `check(model, loss)` runs after each backward.
    The losses, for a test that asks whether they fall."""
    from sparkles.conversation import Message, Text

    model.train()
    encoded = processor.encode(conversation.append(Message("assistant", (Text(answer),))))
    ids, labels = torch.tensor([encoded.rendered.input_ids]), torch.tensor([encoded.rendered.labels])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, encoded.pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if check is not None:
            check(model, loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def two_images(text="Compare IMAGE#1 with IMAGE#2.", colors=("red", "blue")):
    """One user turn placing two solid-colour images."""
    from sparkles.conversation import Conversation, user_message

    return Conversation((user_message(text, [solid(c) for c in colors]),))


def logits(model, processor, conversation) -> torch.Tensor:
    """(T, V) logits of a conversation's prompt, without gradients."""
    encoded = processor.encode(conversation, generation=True)
    with torch.no_grad():
        return model(torch.tensor([encoded.rendered.input_ids]), encoded.pixel_values).logits[0]


@pytest.fixture
def live(chat):
    """A real uvicorn server on 127.0.0.1 in a thread, over the test module's `chat` fixture: (its URL, the app). It
    stops by itself, forced if a stream hangs on."""
    import threading
    import time

    import uvicorn

    from sparkles.serve.server import ServeConfig, create_app

    app = create_app(chat, ServeConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(5)
    if thread.is_alive():
        server.force_exit = True
        thread.join(5)
    assert not thread.is_alive()
