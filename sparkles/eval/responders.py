"""What gets evaluated, behind one interface: our checkpoints, any local Hugging Face image-text-to-text model, and
any OpenAI-compatible endpoint.

A responder answers a batch of conversations (each ends with a user message) with one text each. Local models
batch on the device; endpoints send the batch as concurrent requests. torch and transformers are imported inside
the functions that need them, so an endpoint responder runs without either.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import SamplingParams
from ..conversation import Conversation, Image, Message, Text
from ..errors import ConfigError, ImageLoadError, SparklesError


@runtime_checkable
class Responder(Protocol):
    name: str  # short and file-name safe: the model name in result files

    def describe(self) -> dict[str, Any]:
        """What a score depends on besides the task: model, template, image placement…"""
        ...

    def answer_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[str]:
        """One answer per conversation, in order; a `SparklesError` when it cannot answer."""
        ...


class PartialAnswers(SparklesError):
    """Some conversations of a batch got no answer: `answers` holds None there, `errors` says why."""

    def __init__(self, answers: list[str | None], errors: list[str | None]):
        failed = sum(e is not None for e in errors)
        super().__init__(f"{failed} of {len(errors)} requests failed; first: {next(e for e in errors if e)}")
        self.answers, self.errors = answers, errors


def with_pixels(conversation: Conversation) -> Conversation:
    from ..image import load_images

    return load_images(conversation)


class SparklesResponder:
    """A Sparkles checkpoint: one left-padded batch a call, each image encoded once; a call that carries the last
    call's conversations one turn on (the harness's turn k+1) resumes from their cache (`BatchSession`)."""

    def __init__(self, chat, name: str):
        from ..batch_session import BatchSession

        self.chat, self.name, self.session = chat, name, BatchSession(chat)

    @classmethod
    def load(cls, model: str | None, *, device: str = "cpu", dtype=None) -> SparklesResponder:
        from ..generate import Chat
        from ..model.checkpoint import load

        loaded, processor = load(model, device=device, dtype=dtype)
        return cls(Chat(loaded, processor), safe_name(Path(model).name if model else "default"))

    def describe(self) -> dict[str, Any]:
        config = self.chat.processor.config
        return {"kind": "sparkles", "model": self.name, "template": config.template,
                "system_prompt": config.system_prompt, "tokens_per_image": config.tokens_per_image,
                "image_size": config.vision.image_size, "images": "in place"}

    def answer_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[str]:
        return self.session.answer_batch([with_pixels(c) for c in conversations], params)


def named(conversation: Conversation) -> Conversation:
    """Each named image preceded by its name as text, as the markup writes it ("IMAGE#1<Img>…"): a model shown
    only the image would otherwise never read the name that the prompt and later turns use for it."""

    def parts(message: Message) -> tuple:
        out: list = []
        for p in message.parts:
            if isinstance(p, Image) and p.label is not None:
                out.append(Text(f"IMAGE#{p.label}"))
            out.append(p)
        return _join_texts(out)

    return Conversation(tuple(Message(m.role, parts(m)) for m in conversation.messages), conversation.meta)


def _join_texts(parts: list) -> tuple:
    """Adjacent texts as one, so a name stays in the same text part as the words before its image."""
    out: list = []
    for p in parts:
        if out and isinstance(p, Text) and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].text + p.text)
        else:
            out.append(p)
    return tuple(out)


def hf_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """Chat-template messages with each image as an {"type": "image"} part where it stands, after its name."""
    out = []
    for message in named(conversation).messages:
        content = [{"type": "text", "text": p.text} if isinstance(p, Text) else {"type": "image"}
                   for p in message.parts]
        out.append({"role": message.role, "content": content})
    return out


class HFResponder:
    """Any local HF image-text-to-text model (LLaVA, LLaVA-Interleave, Qwen2-VL, Idefics…), driven through its own
    processor and chat template, with the images in place."""

    def __init__(self, model, processor, name: str):
        self.model, self.processor, self.name = model.eval(), processor, name
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # generation continues each row's last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not getattr(processor, "chat_template", None):
            raise ConfigError(f"the processor of {name} has no chat template; Sparkles places images and turns "
                              "through the model's own template")

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype=None) -> HFResponder:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load an image-text-to-text model from {path!r}: {e}") from None
        return cls(model.to(device), processor, safe_name("hf_" + Path(path.rstrip("/")).name))

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "model": self.name, "class": type(self.model).__name__,
                "template": self.processor.chat_template, "images": "in place"}

    def answer_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[str]:
        import torch

        conversations = [with_pixels(c) for c in conversations]
        prompts = [self.processor.apply_chat_template(hf_messages(c), add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        images = [[slot.pixels for slot in c.slots] for c in conversations]
        inputs = self.processor(text=prompts, images=images if any(images) else None, padding=True,
                                return_tensors="pt").to(self.model.device, dtype=self.model.dtype)  # floats only
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generation(params))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]

    def _generation(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": params.temperature > 0,
                                  "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or None}
        if params.stop:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": getattr(self.processor, "tokenizer", None)}
        return kwargs


def file_data_uri(image: Image) -> str:
    """The image's own file as a data: URI: its bytes unchanged (no re-encoding), its type read from the bytes."""
    from PIL import Image as PILImage

    from ..image import load_image

    if image.source is None or not Path(image.source).is_file():
        load_image(image.source)  # raises the loader's precise error for a missing or unreadable file
        raise ImageLoadError(f"{image.name}: expected an image file to send, got {image.source!r}")
    data = Path(image.source).read_bytes()
    try:
        kind = PILImage.open(io.BytesIO(data)).format
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"cannot read image {image.source}: not an image file or corrupt ({e})") from e
    mime = PILImage.MIME.get(kind, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class EndpointResponder:
    """Any OpenAI-compatible endpoint; images travel as data: URIs, a batch as concurrent requests."""

    def __init__(self, client, name: str | None = None, *, concurrency: int = 8):
        self.client, self.concurrency = client, concurrency
        self.name = name or safe_name("endpoint_" + client.config.model)

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "model": self.client.config.model, "base_url": self.client.config.base_url,
                "images": "in place, as data: URIs"}

    def answer_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[str]:
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(conversations)))) as pool:
            outcomes = list(pool.map(self._one, conversations, [params] * len(conversations)))
        if any(isinstance(o, SparklesError) for o in outcomes):
            raise PartialAnswers([o if isinstance(o, str) else None for o in outcomes],
                                 [str(o) if isinstance(o, SparklesError) else None for o in outcomes])
        return outcomes

    def _one(self, conversation: Conversation, params: SamplingParams) -> str | SparklesError:
        from ..formats import to_openai

        try:
            messages = to_openai(named(conversation), image_url=file_data_uri, on_loss="ignore")
            return self.client.chat(messages, **request_params(params)).text.strip()
        except SparklesError as e:  # returned, not raised: the other requests of the batch keep their answers
            return e


def request_params(params: SamplingParams) -> dict[str, Any]:
    """The OpenAI request fields for our sampling parameters (top_k and repetition penalty have none)."""
    out: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
    if params.top_p < 1:
        out["top_p"] = params.top_p
    if params.seed is not None:
        out["seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    return out


class ReferenceResponder:
    """Answers with a task's reference answers (SparklesEval's GPT-4 ones), to judge the references themselves."""

    def __init__(self, examples, references, name: str = "references"):
        # Items are found by their first question; the turn is the number of answers already given.
        self.by_question = {_first_question(ex.turns[0]): references(ex) for ex in examples}
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"kind": "references", "model": self.name}

    def answer_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[str]:
        return [self.by_question[_first_question(c[0])][len(c) // 2] for c in conversations]


def _first_question(message) -> tuple:
    return (message.text, tuple(image.source for image in message.images))


def make_responder(*, model: str | None = None, hf_model: str | None = None, endpoint: str | None = None,
                   endpoint_model: str | None = None, key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                   device: str = "cpu", dtype: str | None = None) -> Responder:
    """The responder the options name: an endpoint, a local HF model, or a Sparkles checkpoint (the default)."""
    if endpoint:
        from ..client import Client, EndpointConfig

        if not endpoint_model:
            raise ConfigError("an endpoint needs the name of the model it serves (--endpoint-model)")
        return EndpointResponder(Client(EndpointConfig(endpoint, endpoint_model, api_key_env=key_env)),
                                 concurrency=concurrency)
    torch_dtype = getattr(__import__("torch"), dtype) if dtype else None
    if hf_model:
        return HFResponder.load(hf_model, device=device, dtype=torch_dtype)
    return SparklesResponder.load(model, device=device, dtype=torch_dtype)


def safe_name(name: str) -> str:
    """A name fit for file names: letters, digits, '.', '-' and '_' only."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).strip("._")
    return cleaned or "model"
