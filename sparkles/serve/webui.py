"""The web UI: a Gradio chat over many images and many turns, for a person at a browser.

Images can be uploaded at any turn; each is shown labelled IMAGE#k and text can name it. Answers stream; the last
turn can be undone, the chat reset, and the dialogue exported as SparklesDialogue JSON. The state is a plain
`Conversation`, and the pure functions below turn it into what the page shows. Served from a `Chat`, each browser
session also holds a `ChatSession`: a cache of its encoded images and KV positions, freed on reset or when the
browser goes away, and rebuilt from the conversation whenever it is missing. Uploads have a size limit and are
deleted on undo, reset and disconnect; turns pass the server's checks; a row of shapes-world examples shows the model
at work on a first visit. Gradio is imported inside functions, nothing is fetched from the internet, and the core
never imports this module.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from ..config import SamplingParams
from ..conversation import Conversation, Image, Message, Text, user_message
from ..errors import InputError, SparklesError
from ..image import DEFAULT_MAX_PIXELS
from .limits import check_text, text_limit
from .requests import ApiError, check_conversation

MAX_UPLOAD_BYTES = 20 * 2**20  # per image file, as the server takes them
EXAMPLE_SEEDS = ("sparkles-web/0", "sparkles-web/1", "sparkles-web/2")  # fixed: every start shows the same examples

HELP = ("Attach images with the clip button (several at once, at any turn): they become **IMAGE#1**, **IMAGE#2**, … "
        "in order. Name them in your text, e.g. *What differs between IMAGE#1 and IMAGE#2?*")


def add_user_turn(conversation: Conversation, text: str, paths: list[str], *, max_bytes: int = MAX_UPLOAD_BYTES,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Conversation:
    """The conversation with a new user message: `text` plus the uploaded image files, named after earlier ones."""
    from ..image import image_part

    if not text.strip() and not paths:
        raise InputError("type a message or attach an image first")
    if conversation.messages and conversation.messages[-1].role == "user":
        raise InputError("the last message has no answer yet; wait for it, or undo it")
    for path in paths:  # by its size on disk, before reading it: a 50 MB upload costs nothing more
        if (size := os.path.getsize(path)) > max_bytes:
            raise InputError(f"{Path(path).name} is {size / 2**20:.1f} MB; this page takes images of at most "
                             f"{max_bytes / 2**20:g} MB each")
    # The file's own name is the image's id in the exported SparklesDialogue.
    images = [replace(image_part(path, max_bytes=max_bytes, max_pixels=max_pixels), image_id=Path(path).name)
              for path in paths]
    return conversation.append(user_message(text, images, known=conversation.labels))


def check_turn(conversation: Conversation, max_text_chars: int) -> None:
    """The server's checks on a conversation about to be answered; `ApiError` says what is wrong."""
    check_conversation(conversation)
    check_text(conversation, max_text_chars)


class Uploads:
    """The uploaded files that browser sessions show, counted per image, deleted when no dialogue shows them.

    Counted, not owned: gradio stores identical uploads (same bytes, same name) at one path, so one visitor's reset
    must not delete a picture another visitor's chat still shows. Only files inside `folder` (gradio's upload
    folder) are ever deleted, and never one whose hash is in `spare` (the examples', shared by every visitor)."""

    def __init__(self, folder: str | os.PathLike, spare: frozenset[str] = frozenset()):
        self.folder, self.spare = Path(folder).resolve(), spare
        self.shown: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # gradio runs handlers in several threads

    def hold(self, images) -> None:
        with self._lock:
            self.shown.update(image.source for image in images if image.source)

    def drop(self, conversation: Conversation, *, keep: Conversation = Conversation()) -> list[str]:
        """Let go of the images of `conversation` that `keep` (what the page shows next) lacks; returns the files
        deleted."""
        gone = []
        with self._lock:
            for image in conversation.images:
                if image.label in keep.labels or not image.source:
                    continue
                self.shown[image.source] -= 1
                if self.shown[image.source] > 0:
                    continue
                del self.shown[image.source]
                path = Path(image.source).resolve()
                if image.sha256 not in self.spare and path.is_relative_to(self.folder) and path.is_file():
                    path.unlink()
                    gone.append(str(path))
        return gone


def make_examples(folder: str | os.PathLike) -> list[dict]:
    """A first question about shapes-world images, for each fixed seed: {"text", "files"}, images saved in `folder`.

    The text names each image where the world's question shows it, so asking it rebuilds the very same turn."""
    import random

    from ..world.tasks import make_caption, make_dialogue

    examples = []
    for i, seed in enumerate(EXAMPLE_SEEDS):
        rng = random.Random(seed)
        item = make_caption(rng, images=2) if i == len(EXAMPLE_SEEDS) - 1 else make_dialogue(rng)
        first, files = item.turns[0], []
        for image in sorted(first.images, key=lambda image: int(image.label)):  # files are labelled in order
            path = Path(folder) / f"example{i}-{image.name.lower().replace('#', '')}.png"
            image.pixels.save(path)
            files.append(str(path))
        text = "".join(part.text if isinstance(part, Text) else part.name for part in first.parts)
        examples.append({"text": text, "files": files})
    return examples


def add_answer(conversation: Conversation, answer: str) -> Conversation:
    return conversation.append(Message("assistant", (Text(answer.strip()),)))


def undo_turn(conversation: Conversation) -> Conversation:
    """Drop the last user message and its answer (or a user message still waiting for one)."""
    messages = list(conversation.messages)
    if messages and messages[-1].role == "assistant":
        messages.pop()
    if messages and messages[-1].role == "user":
        messages.pop()
    return replace(conversation, messages=tuple(messages))


def chat_messages(conversation: Conversation) -> list[dict]:
    """Chatbot messages: text, and each image as its IMAGE#k label followed by the picture."""
    out = []
    for message in conversation.messages:
        if message.role == "system":
            continue
        content: list = []
        for part in message.parts:
            text = part.text if isinstance(part, Text) else part.name
            if content and isinstance(content[-1], str):  # one bubble per run of text, not per part
                content[-1] += text if isinstance(part, Text) or content[-1][-1:].isspace() else " " + text
            else:
                content.append(text)
            if isinstance(part, Image) and part.source:
                content.append({"path": part.source, "alt_text": part.name})
        out.append({"role": message.role, "content": [c.strip() if isinstance(c, str) else c for c in content]
                    or [""]})
    return out


def gallery_items(conversation: Conversation) -> list[tuple[str, str]]:
    """(file, "IMAGE#k") for every image of the conversation, in order."""
    return [(image.source, image.name) for image in conversation.images if image.source]


def export_dialogue(conversation: Conversation, folder: str | os.PathLike) -> Path:
    """Write the conversation as one SparklesDialogue JSON record; returns the file."""
    from ..formats import to_sparkles_dialogue

    record = to_sparkles_dialogue(conversation, on_loss="ignore")  # image files stay behind: ids name them
    path = Path(folder) / "sparkles_dialogue.json"
    path.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _gradio():
    # Without this, gradio makes DNS lookups at launch (its analytics): the UI must work with no internet.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


def build_demo(chat, params: SamplingParams = SamplingParams(), *, concurrency: int = 1,
               max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The Gradio Blocks app over a `Chat`, whose visitors each get a `ChatSession` (every image encoded once, each
    turn prefilled alone), or an `Engine` that batches the answers of `concurrency` visitors but re-reads every
    turn's whole history. Launch it with ``max_file_size=max_upload_bytes`` so that gradio refuses larger uploads
    before they reach the disk; the page checks the size again, as it does every turn's text."""
    from gradio.utils import get_upload_folder

    from ..image import image_sha256

    gr = _gradio()
    exports = tempfile.mkdtemp(prefix="sparkles-web-")
    (Path(exports) / "examples").mkdir()
    examples = make_examples(Path(exports) / "examples")
    # The examples' files reach gradio's upload folder as copies; cleaning a chat must not take them from others.
    uploads = Uploads(get_upload_folder(), frozenset(image_sha256(Path(f).read_bytes()) for example in examples
                                                     for f in example["files"]))

    def reset(conversation, session):
        uploads.drop(conversation)
        return _views(Conversation(), _free(session))

    def undo(conversation):
        left = undo_turn(conversation)
        uploads.drop(conversation, keep=left)
        return _views(left)  # the session follows at the next turn

    # delete_cache: uploads of browsers that never said goodbye go after a day; files are kept while in use.
    with gr.Blocks(title="Sparkles", delete_cache=(3600, 86400)) as demo:
        # The dialogue: when the browser leaves, gradio deletes it, and with it its uploads.
        state = gr.State(Conversation(), delete_callback=uploads.drop)
        # A cache, not the truth: gradio drops it an hour after its last use or when the browser leaves.
        session = gr.State(None, time_to_live=3600, delete_callback=_free)
        gr.Markdown("## Sparkles: chat about many images\n" + HELP)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Dialogue", height=520)
                box = gr.MultimodalTextbox(elem_id="mmbox", file_count="multiple", file_types=["image"],
                                           sources=["upload"], placeholder="Ask about your images…", show_label=False)
                with gr.Row():
                    undo_button = gr.Button("Undo last turn", elem_id="undo")
                    reset_button = gr.Button("Reset", elem_id="reset")
                    export = gr.Button("Export SparklesDialogue JSON", elem_id="export")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images in this dialogue", elem_id="gallery", columns=2, height=300)
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 2, value=params.temperature, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=params.top_p, step=0.05, label="top_p")
                    length = gr.Slider(1, 2048, value=params.max_new_tokens, step=1, label="max new tokens")
                exported = gr.File(label="SparklesDialogue JSON", elem_id="exported")
        shown = gr.Examples([[example] for example in examples], inputs=[box], elem_id="examples",
                            label="Examples: click one to ask it in a new chat (shapes-world images, the answer is "
                                  "known)")
        respond = _responder(gr, chat, params, max_upload_bytes=max_upload_bytes, uploads=uploads)
        inputs, outputs = [box, state, session, temperature, top_p, length], [chatbot, state, session, box, gallery]
        box.submit(respond, inputs, outputs, concurrency_limit=concurrency)
        views = [chatbot, state, gallery]
        shown.load_input_event.then(reset, [state, session], views + [session]).then(
            respond, inputs, outputs, concurrency_limit=concurrency)
        undo_button.click(undo, [state], views)
        reset_button.click(reset, [state, session], views + [session])
        chatbot.clear(reset, [state, session], views + [session])  # its bin resets too
        export.click(lambda c: str(export_dialogue(c, tempfile.mkdtemp(dir=exports))), [state], [exported])
    return demo


def _views(conversation: Conversation, *extra):
    return chat_messages(conversation), conversation, gallery_items(conversation), *extra


def _free(session) -> None:
    """Let go of a browser session's cache (its KV tensors and encoded images) at once."""
    if session is not None:
        session.close()


def _responder(gr, chat, params: SamplingParams, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_text_chars: int | None = None, uploads: Uploads | None = None):
    """The submit handler: add the user's turn, then stream the answer into the last bubble."""
    max_text_chars = max_text_chars or text_limit(chat.processor.config.max_seq_len, chat.processor.tokenizer)

    def respond(value, conversation, session, temperature, top_p, length):
        try:
            asked = add_user_turn(conversation, value.get("text", ""), list(value.get("files", [])),
                                  max_bytes=max_upload_bytes)
            check_turn(asked, max_text_chars)
        except (SparklesError, ApiError) as e:  # the user can fix it: say so, and keep what they typed
            raise gr.Error(str(e)) from None
        if uploads is not None:  # from here the page shows them (or, should the answer fail, keeps them in the box)
            uploads.hold(asked.messages[-1].images)
        sampling = replace(params, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(length))
        shown, answer = chat_messages(asked) + [{"role": "assistant", "content": ""}], ""
        yield shown, asked, session, None, gallery_items(asked)  # the user's turn shows at once
        try:
            if hasattr(chat, "model"):  # a Chat: this browser's session answers from its cache
                session = _session(session, chat, conversation)
                deltas = session.stream(asked.messages[-1], params=sampling)
            else:
                deltas = chat.stream(asked, sampling)
            for delta in deltas:
                answer += delta
                shown[-1] = {"role": "assistant", "content": answer.lstrip()}
                yield shown, asked, session, None, gallery_items(asked)
        except SparklesError as e:  # e.g. the context is full: back to before this turn
            yield chat_messages(conversation), conversation, session, value, gallery_items(conversation)
            raise gr.Error(str(e)) from None
        # The session may have dropped old turns to make room; the page keeps showing the whole dialogue.
        final = add_answer(asked, answer)
        yield chat_messages(final), final, session, None, gallery_items(final)

    return respond


def _session(session, chat, conversation: Conversation):
    """This browser's session, made on its first turn, brought to the page's dialogue (which undo may have cut)."""
    from ..session import ChatSession

    session = session if session is not None else ChatSession(chat.model, chat.processor,
                                                              lookahead=getattr(chat, "lookahead", 0))
    if not session.follows(conversation):
        session.resume(conversation)
    return session


def add_cli(commands) -> None:
    web = commands.add_parser("web", help="a web UI to chat about many images, in the browser (Gradio)")
    web.add_argument("--model", default=None, help="checkpoint folder, or 'default' (the embedded model)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--max-new-tokens", type=int, default=256, help="the answer length the page starts with")
    web.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20, help="per image file")
    web.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    web.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    web.add_argument("--lookahead", type=int, default=0, metavar="K",
                     help="greedy answers check K guessed tokens a decoding step (prompt lookup; see sparkles chat)")
    web.set_defaults(run=_run, system=None)


def _run(args) -> int:
    from ..cli import load_chat

    # Each visitor gets a session (images encoded once, turns prefilled alone); visitors run side by side in
    # gradio's worker threads rather than in one batch, which for long multi-image chats saves far more.
    max_bytes = int(args.max_upload_mb * 2**20)
    demo = build_demo(load_chat(args), SamplingParams(max_new_tokens=args.max_new_tokens), concurrency=4,
                      max_upload_bytes=max_bytes)
    print(f"Sparkles web UI at http://{args.host}:{args.port} (Ctrl-C stops it)")
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                        max_file_size=max_bytes)
    return 0
