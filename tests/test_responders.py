"""Responders: a tiny LLaVA through its own processor and chat template, an OpenAI-compatible endpoint on
127.0.0.1 with images as data: URIs, and the references responder."""

import base64

import pytest
from evaldata import bison, endpoint, sparkleseval

from sparkles.config import SamplingParams
from sparkles.conversation import Conversation, Message, Text, user_message
from sparkles.eval.harness import RunOptions, evaluate
from sparkles.eval.responders import (
    EndpointResponder,
    HFResponder,
    PartialAnswers,
    ReferenceResponder,
    hf_messages,
    request_params,
)
from sparkles.eval.tasks import conversation_for, load_task
from sparkles.image import image_part

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
            "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A LLaVA built from configs (CLIP tower, Llama LM, byte tokenizer) and saved like a hub folder."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    from sparkles.tokenizer import byte_tokenizer

    tok = byte_tokenizer(("<image>",))
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=16, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TEMPLATE)
    vision = CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=4, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_local_hf_model_through_its_own_template(tiny_llava, tmp_path):
    from PIL import Image as PILImage

    for name, color in (("r.png", "red"), ("b.jpg", "blue")):
        PILImage.new("RGB", (40, 30), color).save(tmp_path / name)
    responder = HFResponder.load(str(tiny_llava))
    assert responder.name == f"hf_{tiny_llava.name}"
    assert responder.describe()["class"] == "LlavaForConditionalGeneration"
    two = Conversation((user_message("Compare IMAGE#1 with IMAGE#2.", [image_part(str(tmp_path / "r.png")),
                                                                        image_part(str(tmp_path / "b.jpg"))]),))
    later = Conversation((user_message("Describe <image>.", [image_part(str(tmp_path / "b.jpg"))]),
                          Message("assistant", (Text("blue"),)), user_message("And IMAGE#1 now?", [], known=["1"])))
    prompt = responder.processor.apply_chat_template(hf_messages(two), add_generation_prompt=True, tokenize=False)
    assert prompt == "user: Compare IMAGE#1<image> with IMAGE#2<image>.\nassistant:"  # images in place, named
    assert hf_messages(later)[1] == {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}
    params = SamplingParams(max_new_tokens=5)
    both = responder.answer_batch([two, later], params)
    assert both == [responder.answer_batch([two], params)[0], responder.answer_batch([later], params)[0]]
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    assert responder.answer_batch([two], sampled) == responder.answer_batch([two], sampled)
    # The whole harness drives it too.
    task = load_task("bison", bison(tmp_path / "data", 2))
    _, results = evaluate(task, responder, RunOptions(out=tmp_path / "run", params=params, progress=False))
    assert [r["status"] for r in results] == ["ok", "ok"]


def test_an_openai_compatible_endpoint(tmp_path):
    task = load_task("bison", bison(tmp_path / "data", 3))

    def reply(body, n):
        text = body["messages"][0]["content"][0]["text"]
        if "a plain yellow picture" in str(body):
            return 400, '{"error": {"message": "no"}}'
        return f"Therefore, the answer is IMAGE#1. ({text[:20]})"

    with endpoint(reply) as (url, calls):
        from sparkles.client import Client, EndpointConfig

        client = Client(EndpointConfig(url, "remote-vlm", backoff=0.0))
        responder = EndpointResponder(client, concurrency=3)
        assert responder.name == "endpoint_remote-vlm"
        conversations = [conversation_for(e, []) for e in task.examples()]
        with pytest.raises(PartialAnswers) as caught:
            responder.answer_batch(conversations, SamplingParams(max_new_tokens=7, seed=0))
        assert caught.value.answers[0].startswith("Therefore") and caught.value.answers[1] is None
        assert "HTTP 400" in caught.value.errors[1]
        body = next(c for c in calls if "plain red" in str(c))
        content = body["messages"][0]["content"]
        assert [p["type"] for p in content[:4]] == ["text", "image_url", "text", "image_url"]
        assert content[0]["text"].endswith("images of IMAGE#1") and content[2]["text"] == " and IMAGE#2"
        uri = content[1]["image_url"]["url"]
        assert uri.startswith("data:image/jpeg;base64,")
        assert base64.b64decode(uri.split(",", 1)[1]) == (tmp_path / "data/images/COCO_val2014_000000001000.jpg") \
            .read_bytes()  # the file's own bytes, not re-encoded
        assert body["max_tokens"] == 7 and body["temperature"] == 0.0 and body["seed"] == 0
        _, results = evaluate(task, responder, RunOptions(out=tmp_path / "run", progress=False))
        assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert request_params(SamplingParams(top_p=0.9, stop=("###",))) == {
        "max_tokens": 256, "temperature": 0.0, "top_p": 0.9, "stop": ["###"]}


def test_references_answer_with_the_annotation(tmp_path):
    from sparkles.eval.tasks.sparkleseval import references

    task = load_task("sparkleseval", sparkleseval(tmp_path, 2))
    responder = ReferenceResponder(task.examples(), references)
    example = task.examples()[1]
    first = responder.answer_batch([conversation_for(example, [])], SamplingParams())
    assert first == ["Reference answer one for item 1."]
    assert responder.answer_batch([conversation_for(example, first)], SamplingParams()) == [
        "Reference answer two for item 1."]
