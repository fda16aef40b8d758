"""Property-based tests (hypothesis): for any input, the pure parts either do what they promise or raise one of our
own errors, never anything else. Each property is checked against a slow, obviously right version where one
exists."""

import base64
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparkles.config import SamplingParams
from sparkles.conversation import Image, Text, parse_markup, to_markup
from sparkles.errors import InputError, SparklesError
from sparkles.image import load_image
from sparkles.jsonl import repair_tail
from sparkles.processor import TextStream, overlap, prefix_table
from sparkles.tokenizer import byte_tokenizer
from sparkles.world.scoring import Truth, read_objects, score

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SMALL = st.text(alphabet="ab", max_size=12)  # a two-letter alphabet makes overlaps common


@FAST
@given(SMALL, SMALL.filter(bool))
def test_the_linear_overlap_equals_the_quadratic_one(text, word):
    slow = max((k for k in range(min(len(text), len(word) - 1), -1, -1) if text.endswith(word[:k])), default=0)
    assert overlap(text, word, prefix_table(word)) == slow


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(("<image>",))


@FAST
@given(text=st.text(alphabet=string.ascii_lowercase[:3] + " é😀", max_size=30),
       stops=st.lists(st.text(alphabet="abc é", min_size=1, max_size=4), max_size=3))
def test_a_stream_shows_exactly_the_text_before_the_first_stop_string(tokenizer, text, stops):
    stream, shown = TextStream(tokenizer, stops), ""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        shown += stream.push(token)
        assert text.startswith(shown)  # never a character that is later taken back, never half of one
        if stream.stopped:
            break
    shown += stream.finish()
    # Generation stops as soon as a stop string is complete, and the text is cut where the earliest one found in
    # the text so far begins (a longer stop string that began earlier may not be complete yet).
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    if ends:
        seen = text[:min(ends)]
        assert shown == seen[:min(i for i in (seen.find(s) for s in stops) if i >= 0)]
    else:
        assert shown == text
    assert stream.stopped == bool(ends)


TRUTHS = [Truth("bison", "IMAGE#2 matches it.", ("2",)), Truth("nlvr2", "True.", ("1", "2"), value=True),
          Truth("count", "IMAGE#1 has two circles.", ("1",), count=2),
          Truth("which", "IMAGE#1 has a red star.", ("1",)),
          Truth("share", "IMAGE#1 and IMAGE#2 both have a red shape.", ("1", "2"), words=("red",)),
          Truth("caption", "IMAGE#1 shows a big red circle on a plain background.", ("1",),
                words=("a big red circle on a plain background",))]
WORDS = st.lists(st.sampled_from(["IMAGE#1", "IMAGE#2", "image #3", "so", "therefore", "answer:", "two", "no",
                                  "red", "circles", "a", "big", "true", "false", ".", ",", "\n", "shows",
                                  "background", "plain"]) | st.text(max_size=5), max_size=25).map(" ".join)


@FAST
@given(WORDS, st.sampled_from(TRUTHS))
def test_the_scorer_reads_any_answer_without_raising(answer, truth):
    result = score(truth, answer)
    assert isinstance(result.correct, bool) and result.kind == truth.kind
    objects, backgrounds = read_objects(answer)
    assert all(n > 0 for n in objects.values()) and backgrounds <= {"plain", "striped", "noisy", "gradient"}


PARTS = st.lists(st.one_of(st.text(alphabet=st.characters(exclude_characters="<>#"), min_size=1).map(Text),
                           st.sampled_from(["1", "2", "10"]).map(lambda k: Image(label=k))), max_size=6)


@FAST
@given(PARTS)
def test_markup_round_trips(parts):
    merged = []  # adjacent texts are one text once written out
    for part in parts:
        if merged and isinstance(part, Text) and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + part.text)
        else:
            merged.append(part)
    assert parse_markup(to_markup(parts)) == tuple(merged)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_load_as_an_image_or_raise_an_input_error(data):
    for source in (data, "data:image/png;base64," + base64.b64encode(data).decode()):
        try:
            loaded = load_image(source, max_pixels=64 * 64)
        except InputError:
            continue
        assert loaded.pixels.mode == "RGB" and loaded.pixels.width * loaded.pixels.height <= 64 * 64


def _png() -> bytes:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


@FAST
@given(st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_mutated_png_loads_or_raises_an_input_error(edits):
    data = bytearray(PNG)
    for where, byte in edits:
        data[where] = byte
    try:
        loaded = load_image(bytes(data), max_pixels=64 * 64)
    except InputError:
        return
    assert loaded.pixels.mode == "RGB"


@FAST
@given(st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                                        "seed"]),
                       st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True)),
                       max_size=4))
def test_sampling_params_are_valid_or_refused_with_our_error(fields):
    try:
        params = SamplingParams(**fields)
    except SparklesError:
        return
    assert params.max_new_tokens >= 1 and params.temperature >= 0 and 0 < params.top_p <= 1


@FAST
@given(st.lists(st.dictionaries(st.text(max_size=3), st.integers()), max_size=4), st.binary(max_size=40))
def test_a_torn_tail_is_cut_and_every_whole_line_kept(tmp_path_factory, records, tail):
    path = tmp_path_factory.mktemp("jsonl") / "results.jsonl"
    whole = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(whole + tail)
    cut = repair_tail(path, warn=False)
    kept = path.read_bytes()
    if b"\n" in tail:  # the tail ends in a newline or holds whole lines of its own: all of those stay
        last = tail.rfind(b"\n") + 1
        assert kept == whole + tail[:last] and cut == (last < len(tail))
    else:
        assert kept == whole and cut == bool(tail)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed",
          "stop", "stream", "n", "logprobs", "repetition_penalty", "stream_options", "response_format", "tools"]


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON, st.booleans())
def test_any_request_body_is_parsed_or_refused_with_a_4xx(body, named):
    from sparkles.serve.requests import ApiError, parse_request

    if isinstance(body, dict) and named:
        body = {**body, "model": "sparkles"}  # past the model check, to reach the other fields more often
    try:
        request = parse_request(body, "sparkles")
    except ApiError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert isinstance(request.messages, list) and request.params.temperature >= 0
