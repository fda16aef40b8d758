"""The `sparkles` command: parse arguments, call one function, print. The chat REPL lives here.

This is the I/O edge: environment, devices and printing are handled here and nowhere else. A `SparklesError`
becomes one line, ``error: …``, on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from .errors import SparklesError

# Commands that live in their feature's module, which declares them through `add_cli(subparsers)`. Only the module
# of the command being run is imported, so `sparkles render` never pays for torch and `sparkles chat` for fastapi.
FEATURE_COMMANDS = {
    "demo": ("world.demo", "watch the default model talk about several images over several turns"),
    "train": ("train.recipes", "train or fine-tune a model (one process or torchrun)"),
    "eval": ("eval.cli", "evaluate a model on SparklesEval, BISON, NLVR2 or the shapes world"),
    "world": ("world.sets", "generate the synthetic shapes world's datasets"),
    "synth": ("synth.cli", "generate SparklesDialogue-style dialogues with a teacher LLM"),
    "serve": ("serve.server", "an OpenAI-compatible HTTP server"),
    "web": ("serve.webui", "a web UI for multi-image chat"),
    "export": ("model.export", "write a checkpoint in the HF LLaVA layout (transformers, vLLM, SGLang)"),
    "merge": ("model.merge", "mix the weights of checkpoints of one architecture (SPHINX's weight mixing)"),
    "visual-cache": ("model.visual_cache_cli", "ImageBind-LLM's visual cache: build one from a folder of images, or "
                     "switch it on in a copy of a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except SparklesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkles", description="Chat with vision-language models across many "
                                     "images and many turns, and build such models.")
    commands = parser.add_subparsers(title="commands")

    chat = commands.add_parser("chat", help="answer one prompt about images, or chat in a REPL without a prompt")
    chat.add_argument("prompt", nargs="?", help="the question; place images with <image> or name them IMAGE#k")
    chat.add_argument("--model", default=None, help="checkpoint folder, or 'default' (the embedded model)")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image file, data: URI or (with --allow-http) URL; repeat for IMAGE#1, IMAGE#2, …")
    chat.add_argument("--json", action="store_true", help='print {"answer": …, "images": […]} instead of text')
    chat.add_argument("--system", default=None, help="replace the model's system prompt")
    chat.add_argument("--allow-http", action="store_true", help="allow http(s) image URLs")
    chat.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    chat.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    chat.add_argument("--lookahead", type=int, default=0, metavar="K",
                      help="greedy answers check K guessed tokens a decoding step (prompt lookup): the same answer, "
                      "in fewer steps")
    _sampling_arguments(chat)
    chat.set_defaults(run=_run_chat)

    render = commands.add_parser("render", help="show how a record becomes tokens: loss, images, template")
    render.add_argument("file", help="a JSON list or JSONL file of records")
    render.add_argument("--format", default="sparkles", choices=["sparkles", "openai", "llava"],
                        help="SparklesDialogue/SparklesEval items, OpenAI message lists, or LLaVA records")
    render.add_argument("--index", type=int, default=0, help="which record (0-based)")
    render.add_argument("--model", default=None, help="whose tokenizer and template (a checkpoint folder)")
    render.add_argument("--loss-on", default="all", choices=["all", "last", "none"])
    render.add_argument("--color", action="store_true", help="mark supervised tokens with a green background")
    render.set_defaults(run=_run_render)

    convert = commands.add_parser("convert", help="import a released model into a Sparkles checkpoint folder")
    convert.add_argument("kind", choices=["sparkleschat"], help="which release")
    convert.add_argument("--pth", required=True, help="sparkleschat_7b.pth (or a MiniGPT-4 .pth)")
    convert.add_argument("--blip2", required=True, help="a BLIP-2 checkpoint folder in HF format (ViT-g + Q-Former)")
    convert.add_argument("--vicuna", required=True, help="a Vicuna-7B v0 folder in HF format")
    convert.add_argument("--out", required=True, help="where to write the checkpoint folder")
    convert.set_defaults(run=_run_convert)
    for name, (module, summary) in FEATURE_COMMANDS.items():
        if importlib.util.find_spec(f"sparkles.{module}") is None:
            continue  # a feature not built yet
        if name == command:
            importlib.import_module(f"sparkles.{module}").add_cli(commands)
        else:
            commands.add_parser(name, help=summary)
    return parser


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=[], help="an extra stop string; repeatable")
    group.add_argument("--seed", type=int, default=None)


def _sampling(args):
    from .config import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                          seed=args.seed)


def load_chat(args):
    import dataclasses

    import torch

    from .generate import Chat
    from .model.checkpoint import is_untrained_default, load
    from .processor import Processor

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor = load(args.model, dtype=dtype, device=check_device(args.device))
    if args.system is not None:
        check_text(args.system, "--system")
        processor = Processor(processor.tokenizer, dataclasses.replace(processor.config, system_prompt=args.system))
    if is_untrained_default(args.model):
        print("note: no trained default model is installed yet, so Sparkles built a tiny untrained one: its answers "
              "are random text. Pass --model DIR to chat with a trained checkpoint.", file=sys.stderr)
    lookahead = getattr(args, "lookahead", 0)
    if lookahead < 0:
        from .errors import ConfigError

        raise ConfigError(f"--lookahead must be 0 (off) or more guessed tokens a step, got {lookahead}")
    return Chat(model, processor, lookahead=lookahead)


def check_device(name: str) -> str:
    """A device torch knows and this machine has, or a ConfigError that says which it has."""
    import torch

    from .errors import ConfigError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {name!r} is not a device: expected cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asks for CUDA, but this machine has no CUDA GPU (or torch was built "
                          "without CUDA); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def check_text(text: str, what: str) -> str:
    """Text that is valid Unicode: bytes that are not UTF-8 reach us as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        from .errors import InputError

        raise InputError(f"{what} is not valid UTF-8 text: {text[e.start:e.end].encode('utf-8', 'surrogateescape')!r}"
                         f" at character {e.start}") from None
    return text


def _run_chat(args) -> int:
    from .image import image_part

    if args.prompt is not None and not check_text(args.prompt, "the prompt").strip():
        raise _usage("the prompt is empty: ask a question, or leave the prompt out to chat in a REPL")
    sampling = _sampling(args)
    images = [image_part(path, allow_http=args.allow_http) for path in args.image]  # fail fast, before the model
    if args.prompt is None:
        return _repl(load_chat(args), images, sampling, allow_http=args.allow_http)
    from .conversation import Conversation, user_message

    message = user_message(args.prompt, images)
    conversation = Conversation((message,))
    chat = load_chat(args)
    answer = chat.answer(conversation, sampling)
    if args.json:
        listed = [{"name": f"IMAGE#{i.label}", "source": i.source, "sha256": i.sha256} for i in message.images]
        print(json.dumps({"answer": answer, "images": listed}, ensure_ascii=False))
    else:
        print(answer)
    return 0


REPL_HELP = """Type a message and press Enter. Place images with <image> or name them IMAGE#k.
  /image PATH   add an image; it becomes the next IMAGE#k
  /undo         forget the last question and its answer
  /retry        answer the last question again
  /reset        forget the conversation and its images
  /quit         leave (or Ctrl-D)"""


def _repl(chat, images, sampling, *, allow_http: bool) -> int:
    """A multi-turn chat on stdin/stdout; a bad line prints an error and the chat goes on.

    A `ChatSession` holds the conversation: each image is encoded once and each turn prefills only its own tokens.
    """
    from .conversation import Image
    from .image import image_part
    from .session import ChatSession

    session, pending = ChatSession(chat.model, chat.processor, lookahead=chat.lookahead), list(images)
    try:  # a line that is not UTF-8 reaches check_text, which refuses it, and the session goes on
        sys.stdin.reconfigure(errors="surrogateescape")
    except Exception:  # noqa: BLE001 (a stdin that is no text file: a test's, or a pipe's replacement)
        pass
    print(REPL_HELP)
    for i, image in enumerate(pending):
        print(f"IMAGE#{i + 1}: {image.source}")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        try:
            check_text(line, "this line")
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                session.reset()
                pending = []
                print("(conversation and images cleared)")
            elif line == "/undo":
                forgotten = session.undo()
                print("(forgot: " + "".join(p.name if isinstance(p, Image) else p.text for p in forgotten.parts) + ")")
                pending = [*forgotten.images, *pending]  # its images wait for the next message, under the same names
            elif line == "/retry":
                _print_stream(session.regenerate(sampling))
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise _usage("/image needs a path: /image photos/a.jpg")
                pending.append(image_part(path, allow_http=allow_http))
                print(f"IMAGE#{len(session.labels) + len(pending)}: {path}")
            elif line.startswith("/"):
                raise _usage(f"unknown command {line.split()[0]}; commands: /image PATH, /undo, /retry, /reset, "
                             "/quit")
            elif line:
                stream = session.stream(line, pending, sampling)  # a bad message raises here, keeping the images
                pending = []
                _print_stream(stream)
        except SparklesError as e:
            print(f"error: {e}", file=sys.stderr)


def _print_stream(stream) -> None:
    """Print an answer as it comes; Ctrl-C stops it (what was said so far stays in the session) and the chat goes on."""
    started = False
    try:
        for delta in stream:
            delta = delta if started else delta.lstrip()
            started = started or bool(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
        print(" (stopped)", end="")
    print()


def _usage(message: str) -> SparklesError:
    from .errors import InputError

    return InputError(message)


def _run_render(args) -> int:
    from pathlib import Path

    from . import formats
    from .errors import InputError
    from .model.checkpoint import load_processor
    from .train.records import read_records

    records = read_records(Path(args.file))
    if not 0 <= args.index < len(records):
        raise InputError(f"{args.file} has {len(records)} records; --index {args.index} is out of range")
    if isinstance(records[args.index], InputError):  # a line that is not JSON
        raise InputError(f"{args.file}, record {args.index}: {records[args.index]}")
    reader = {"sparkles": formats.from_sparkles_dialogue, "openai": formats.from_openai,
              "llava": formats.from_llava}[args.format]
    conversation = reader(records[args.index])
    processor = load_processor(args.model)
    if processor.views > 1:
        conversation = _with_sizes(conversation, args.file)
    rendered = processor.render(conversation, loss_on=args.loss_on)
    supervised = sum(label != -100 for label in rendered.labels)
    print(processor.visualize(rendered, color=args.color))
    print(f"\n{len(rendered)} tokens, {supervised} with loss, {len(rendered.image_starts)} images × "
          f"{1 if processor.adapted else processor.config.tokens_per_image} tokens"
          + (" a view" if processor.views > 1 else "")
          + f" at {rendered.image_starts}")
    if processor.views > 1:
        _print_tiles(processor, conversation, rendered)
    return 0


def _with_sizes(conversation, file: str):
    """The conversation with its images loaded where they can be: which tiles are skipped depends on their sizes.
    Images are looked for as written and next to the records' file; one that cannot be read shows every tile."""
    from dataclasses import replace
    from pathlib import Path

    from .conversation import Image, Message
    from .errors import ImageLoadError
    from .image import load_image

    def load(part):
        if not isinstance(part, Image) or part.pixels is not None or part.source is None:
            return part
        for root in (None, Path(file).parent):
            try:
                return replace(part, pixels=load_image(part.source, root=root).pixels)
            except ImageLoadError:
                continue
        return part

    return replace(conversation, messages=tuple(Message(m.role, tuple(load(p) for p in m.parts))
                                                for m in conversation.messages))


def _print_tiles(processor, conversation, rendered) -> None:
    """Per image: its size, the global view and the tile grid (■ encoded, □ only padding: one skip token)."""
    rows, cols = processor.config.tiles.grid
    k = processor.config.tokens_per_image
    for image, start in zip(conversation.slots, rendered.image_starts):
        span, kept = processor.image_span(rendered.input_ids, start)
        size = "{}×{}".format(*image.pixels.size) if image.pixels is not None else "size unknown: every tile counted"
        print(f"{image.name} ({size}): global view + {rows}×{cols} tiles, {sum(kept)} encoded, "
              f"{len(kept) - sum(kept)} skipped: {span} tokens = {1 + sum(kept)} × {k} + {len(kept) - sum(kept)}")
        for r in range(rows):
            print("    " + " ".join("■" if kept[r * cols + c] else "□" for c in range(cols)))


def _run_convert(args) -> int:
    from .model.checkpoint import compose_sparkleschat

    folder = compose_sparkleschat(args.pth, args.blip2, args.vicuna, args.out)
    print(f"wrote {folder}; chat with: sparkles chat --model {folder} --image a.jpg \"Describe IMAGE#1\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
