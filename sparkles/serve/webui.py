"""The web UI: a Gradio chat over many images and many turns, for a person at a browser.

Images can be uploaded at any turn; each is shown labelled IMAGE#k and text can name it. Answers stream; the last
turn can be undone, the chat reset, and the dialogue exported as SparklesDialogue JSON. The state is a plain
`Conversation`, and the pure functions below turn it into what the page shows. Served from a `Chat`, each browser
session also holds a `ChatSession`: a cache of its encoded images and KV positions, freed on reset or when the
browser goes away, and rebuilt from the conversation whenever it is missing. Gradio is imported inside
functions, nothing is fetched from the internet, and the core never imports this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from ..config import SamplingParams
from ..conversation import Conversation, Image, Message, Text, user_message
from ..errors import InputError, SparklesError

HELP = ("Attach images with the clip button (several at once, at any turn): they become **IMAGE#1**, **IMAGE#2**, … "
        "in order. Name them in your text, e.g. *What differs between IMAGE#1 and IMAGE#2?*")


def add_user_turn(conversation: Conversation, text: str, paths: list[str]) -> Conversation:
    """The conversation with a new user message: `text` plus the uploaded image files, named after earlier ones."""
    from ..image import image_part

    if not text.strip() and not paths:
        raise InputError("type a message or attach an image first")
    if conversation.messages and conversation.messages[-1].role == "user":
        raise InputError("the last message has no answer yet; wait for it, or undo it")
    # The file's own name is the image's id in the exported SparklesDialogue.
    images = [replace(image_part(path), image_id=Path(path).name) for path in paths]
    return conversation.append(user_message(text, images, known=conversation.labels))


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


def build_demo(chat, params: SamplingParams = SamplingParams(), *, concurrency: int = 1):
    """The Gradio Blocks app over a `Chat`, whose visitors each get a `ChatSession` (every image encoded once, each
    turn prefilled alone), or an `Engine` that batches the answers of `concurrency` visitors but re-reads every
    turn's whole history."""
    gr = _gradio()
    exports = tempfile.mkdtemp(prefix="sparkles-web-")
    with gr.Blocks(title="Sparkles") as demo:
        state = gr.State(Conversation())
        # A cache, not the truth: gradio drops it an hour after its last use or when the browser leaves.
        session = gr.State(None, time_to_live=3600, delete_callback=_free)
        gr.Markdown("## Sparkles: chat about many images\n" + HELP)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Dialogue", height=520)
                box = gr.MultimodalTextbox(elem_id="mmbox", file_count="multiple", file_types=["image"],
                                           sources=["upload"], placeholder="Ask about your images…", show_label=False)
                with gr.Row():
                    undo = gr.Button("Undo last turn", elem_id="undo")
                    reset = gr.Button("Reset", elem_id="reset")
                    export = gr.Button("Export SparklesDialogue JSON", elem_id="export")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images in this dialogue", elem_id="gallery", columns=2, height=300)
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 2, value=params.temperature, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=params.top_p, step=0.05, label="top_p")
                    length = gr.Slider(1, 2048, value=params.max_new_tokens, step=1, label="max new tokens")
                exported = gr.File(label="SparklesDialogue JSON", elem_id="exported")
        respond = _responder(gr, chat, params)
        box.submit(respond, [box, state, session, temperature, top_p, length], [chatbot, state, session, box, gallery],
                   concurrency_limit=concurrency)
        views = [chatbot, state, gallery]
        undo.click(lambda c: _views(undo_turn(c)), [state], views)  # the session follows at the next turn
        reset.click(lambda s: _views(Conversation(), _free(s)), [session], views + [session])
        chatbot.clear(lambda s: _views(Conversation(), _free(s)), [session], views + [session])  # its bin resets too
        export.click(lambda c: str(export_dialogue(c, tempfile.mkdtemp(dir=exports))), [state], [exported])
    return demo


def _views(conversation: Conversation, *extra):
    return chat_messages(conversation), conversation, gallery_items(conversation), *extra


def _free(session) -> None:
    """Let go of a browser session's cache (its KV tensors and encoded images) at once."""
    if session is not None:
        session.close()


def _responder(gr, chat, params: SamplingParams):
    """The submit handler: add the user's turn, then stream the answer into the last bubble."""

    def respond(value, conversation, session, temperature, top_p, length):
        try:
            asked = add_user_turn(conversation, value.get("text", ""), list(value.get("files", [])))
        except SparklesError as e:  # the user can fix it: say so, and keep what they typed
            raise gr.Error(str(e)) from None
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

    session = session if session is not None else ChatSession(chat.model, chat.processor)
    if not session.follows(conversation):
        session.resume(conversation)
    return session


def add_cli(commands) -> None:
    web = commands.add_parser("web", help="a web UI to chat about many images, in the browser (Gradio)")
    web.add_argument("--model", default=None, help="checkpoint folder, or 'default' (the embedded model)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--max-new-tokens", type=int, default=256, help="the answer length the page starts with")
    web.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    web.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    web.set_defaults(run=_run, system=None)


def _run(args) -> int:
    from ..cli import load_chat

    # Each visitor gets a session (images encoded once, turns prefilled alone); visitors run side by side in
    # gradio's worker threads rather than in one batch, which for long multi-image chats saves far more.
    demo = build_demo(load_chat(args), SamplingParams(max_new_tokens=args.max_new_tokens), concurrency=4)
    print(f"Sparkles web UI at http://{args.host}:{args.port} (Ctrl-C stops it)")
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
    return 0
