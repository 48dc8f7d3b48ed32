"""A chat-trained adapter in use: its template travels to eval, generate --chat, lora-gpt2 chat,
serve's /v1/chat/completions (through the official openai client) and the PEFT and merged
exports (through transformers' apply_chat_template); all of them agree token for token."""

import json

import pytest
import torch

from lora_gpt2 import tokenizer
from lora_gpt2.checkpoints.reading import load_with_adapter, read_adapter
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import generate
from lora_gpt2.training import train

from helpers import train_config
from serving import KEY, base_engine, running_server
from test_chat_data import MARKED, conversations, write_jsonl

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 7.1, and more"}]


@pytest.fixture(scope="module")
def chat_run(world, tmp_path_factory):
    """A run trained on conversations with a template of its own, and the model it saved."""
    base, _, _ = world
    root = tmp_path_factory.mktemp("chat-run")
    data = write_jsonl(root / "talk.jsonl", conversations(40))
    template = root / "marked.jinja"
    template.write_text(MARKED)
    out = root / "run"
    train(train_config(base, data, out, block_size=96, max_steps=16, lr=2e-2, eval_interval=8,
                       targets=("attn", "lm_head"), chat_template=str(template)))
    net, info = load_with_adapter(str(out), dtype="float32", device="cpu")
    return out, net, info


def greedy_reply(net, template, messages, n=12):
    ids = template.prompt(messages)
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_token=tokenizer.EOT_ID)
    return tokenizer.decode(list(generate(net, ids, cfg))), ids


@pytest.fixture(scope="module")
def chat_server(world, chat_run):
    engine = base_engine(world[0])
    engine.adapters.add("talk", read_adapter(chat_run[0]))
    engine.start()
    try:
        with running_server(engine) as url:
            import openai

            yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0), url
    finally:
        engine.stop()


def test_the_adapter_records_its_template_and_eval_reproduces_the_logged_val_loss(chat_run, cli):
    out, _, info = chat_run
    meta = json.loads((out / "best" / "adapter.json").read_text())
    assert meta["chat_template"]["text"] == MARKED and info.chat_template.text == MARKED
    assert meta["eval"]["data_kind"] == "chat" and meta["eval"]["train_on"] == "assistant"
    code, stdout, err = cli("eval", "--adapter", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "chat" and report["mask_prompt"] is True
    assert report["adapter"]["loss"] == pytest.approx(meta["val_loss"], rel=1e-6)
    code, stdout, _ = cli("eval", "--adapter", out, "--json", "--train-on", "all")
    assert json.loads(stdout)["counted_tokens"] > report["counted_tokens"]


def test_served_greedy_chat_equals_lora_gpt2_chat_and_generate_on_the_rendered_prompt(chat_server, chat_run, cli):
    client, _ = chat_server
    out, net, info = chat_run
    expected, ids = greedy_reply(net, info.chat_template, ASK)
    answer = client.chat.completions.create(model="talk", messages=ASK, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids) and answer.object == "chat.completion"
    assert answer.choices[0].finish_reason in ("stop", "length") and 0 < answer.usage.completion_tokens <= 12
    code, stdout, err = cli("chat", "--adapter", out, "--one-shot", "--temperature", "0", "--max-new-tokens", "12",
                            "--system", "Be brief.", input_text=ASK[1]["content"])
    assert code == 0, err
    assert stdout == expected + "\n"
    code, stdout, _ = cli("generate", "--adapter", out, "--chat", "--system", "Be brief.", "--temperature", "0",
                          "--max-new-tokens", "12", ASK[1]["content"])
    assert stdout == expected + "\n"


def test_streamed_chat_is_the_same_text_in_openais_chunks_with_usage_last(chat_server, chat_run):
    client, _ = chat_server
    plain = client.chat.completions.create(model="talk", messages=ASK, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="talk", messages=ASK, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_and_seeds_choice_i_is_the_request_with_seed_plus_i(chat_server):
    client, _ = chat_server
    many = client.chat.completions.create(model="talk", messages=ASK, max_tokens=8, temperature=1.0, n=3, seed=40)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        one = client.chat.completions.create(model="talk", messages=ASK, max_tokens=8, temperature=1.0, seed=40 + i)
        assert one.choices[0].message.content == choice.message.content
    assert len({c.message.content for c in many.choices}) > 1


def test_chat_logprobs_are_the_models_own(chat_server, chat_run):
    client, _ = chat_server
    _, net, info = chat_run
    answer = client.chat.completions.create(model="talk", messages=ASK, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=3)
    content = answer.choices[0].logprobs.content
    ids = info.chat_template.prompt(ASK)
    with torch.no_grad():
        for entry in content:
            logp = torch.log_softmax(net(torch.tensor([ids]))[0, -1].double(), -1)
            token = int(logp.argmax())
            assert bytes(entry.bytes) == tokenizer.get_encoding().decode_single_token_bytes(token)
            assert entry.logprob == pytest.approx(float(logp[token]), abs=2e-4)
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
            ids.append(token)


def test_the_base_model_and_adapters_without_a_template_answer_with_the_default_one(chat_server, world):
    from lora_gpt2.chat_template import ChatTemplate

    client, _ = chat_server
    base_net = world[2][None]
    expected, _ = greedy_reply(base_net, ChatTemplate(), ASK, n=6)
    answer = client.chat.completions.create(model="tiny-base", messages=ASK, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == expected


@pytest.mark.parametrize("body, param, message", [
    ({"model": "talk"}, "messages", "messages: is required"),
    ({"model": "talk", "messages": []}, "messages", "'messages' is empty"),
    ({"model": "talk", "messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown role 'robot'"),
    ({"model": "talk", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages", "the last message is the assistant's"),
    ({"model": "talk", "messages": ASK, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"model": "talk", "messages": ASK, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"model": "talk", "messages": ASK, "logprobs": True, "top_logprobs": 9}, "top_logprobs", "between 0 and 5"),
    ({"model": "talk", "messages": ASK, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens", "differ"),
    ({"model": "talk", "messages": ASK, "max_completion_tokens": -1}, "max_completion_tokens", "between 0 and"),
    ({"model": "talk", "messages": ASK, "response_format": {"type": "json_object"}}, "response_format", "only"),
])
def test_bad_chat_requests_get_openais_error_shape_and_the_server_keeps_serving(chat_server, body, param, message):
    import requests

    client, url = chat_server
    reply = requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="talk", messages=ASK, max_tokens=1).choices[0].finish_reason


def test_an_unknown_model_is_404(chat_server):
    import openai

    client, _ = chat_server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nobody", messages=ASK)


def test_an_unset_max_tokens_runs_to_the_end_of_the_turn_or_the_context(chat_server, chat_run):
    client, _ = chat_server
    _, net, info = chat_run
    answer = client.chat.completions.create(model="talk", messages=ASK, temperature=0)
    context = net.config.n_positions
    ids = info.chat_template.prompt(ASK)
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == context - len(ids)
    else:
        assert answer.usage.completion_tokens < context - len(ids)


def test_lora_gpt2_chat_keeps_the_history_and_obeys_reset_and_system(chat_run, cli):
    out, net, info = chat_run
    lines = "Hello there\n/system Be brief.\nQuestion 7.1\n/reset\nAgain\n/bogus\n"
    code, stdout, err = cli("chat", "--adapter", out, "--interactive", "--temperature", "0", "--max-new-tokens", "6",
                            input_text=lines)
    assert code == 0, err
    first, _ = greedy_reply(net, info.chat_template, [{"role": "user", "content": "Hello there"}], 6)
    second, _ = greedy_reply(net, info.chat_template, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first}, {"role": "user", "content": "Question 7.1"}], 6)
    third, _ = greedy_reply(net, info.chat_template, [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Again"}], 6)
    assert stdout == f"{first}\n{second}\n{third}\n"
    assert "(history cleared)" in err and "unknown command '/bogus'" in err


def test_lora_gpt2_chat_one_shot_takes_a_json_conversation_and_refuses_bad_ones(chat_run, cli):
    out, net, info = chat_run
    code, stdout, _ = cli("chat", "--adapter", out, "--one-shot", "--temperature", "0", "--max-new-tokens", "6",
                          input_text=json.dumps({"messages": ASK}))
    assert code == 0 and stdout == greedy_reply(net, info.chat_template, ASK, 6)[0] + "\n"
    for given, message in [("", "nothing to answer: stdin is empty"),
                           (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
                            "the last message is the assistant's")]:
        code, stdout, err = cli("chat", "--adapter", out, "--one-shot", input_text=given)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err


def test_peft_and_merged_exports_carry_the_template_for_apply_chat_template(chat_run, cli, tmp_path):
    from transformers import AutoTokenizer

    out, _, info = chat_run
    talk = ASK + [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And?"}]
    assert cli("export", out, tmp_path / "peft")[0] == 0
    assert cli("merge", out, tmp_path / "merged")[0] == 0
    for folder in ("peft", "merged"):
        theirs = AutoTokenizer.from_pretrained(tmp_path / folder)
        assert theirs.chat_template == MARKED
        ids = theirs.apply_chat_template(talk, add_generation_prompt=True)["input_ids"]
        assert ids == info.chat_template.prompt(talk)
    # and lora-gpt2 reads the template back from the PEFT folder
    assert read_adapter(tmp_path / "peft").chat_template.text == MARKED


def test_a_damaged_template_record_is_refused_by_name(chat_run, tmp_path, cli):
    import shutil

    out, _, _ = chat_run
    copy = tmp_path / "adapter"
    shutil.copytree(out / "best", copy)
    meta = json.loads((copy / "adapter.json").read_text())
    meta["chat_template"]["text"] += " "
    (copy / "adapter.json").write_text(json.dumps(meta))
    code, _, err = cli("chat", "--adapter", copy, "--one-shot", input_text="hi")
    assert code == 1 and "the chat template's sha256 does not match its text" in err


def test_chat_and_completions_requests_share_the_batch_and_each_stays_exact(chat_server, chat_run, world):
    from concurrent.futures import ThreadPoolExecutor

    from serving import greedy_text

    client, _ = chat_server
    _, net, info = chat_run
    expected_chat, _ = greedy_reply(net, info.chat_template, ASK, 16)
    expected_text = greedy_text(world[2], None, "The sea", 16)

    def chat(_):
        return client.chat.completions.create(model="talk", messages=ASK, max_tokens=16,
                                              temperature=0).choices[0].message.content

    def complete(_):
        return client.completions.create(model="tiny-base", prompt="The sea", max_tokens=16,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        chats = [pool.submit(chat, i) for i in range(3)]
        texts = [pool.submit(complete, i) for i in range(3)]
        assert [f.result() for f in chats] == [expected_chat] * 3
        assert [f.result() for f in texts] == [expected_text] * 3


def test_a_gguf_export_carries_the_template_for_llama_cpp(chat_run, cli, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'lora-gpt2[gguf]')")
    out, _, _ = chat_run
    code, _, err = cli("export", "--format", "gguf", "--gguf-type", "f32", out, tmp_path / "chat.gguf")
    assert code == 0, err
    assert gguf.GGUFReader(tmp_path / "chat.gguf").fields["tokenizer.chat_template"].contents() == MARKED
    assert cli("export", "--format", "gguf", "--base-only", out, tmp_path / "base.gguf")[0] == 0
    assert "tokenizer.chat_template" not in gguf.GGUFReader(tmp_path / "base.gguf").fields  # the base has none


def test_a_message_the_template_refuses_is_said_and_the_conversation_goes_on(chat_run, tmp_path, cli):
    import hashlib
    import shutil

    out, net, _ = chat_run
    copy = tmp_path / "adapter"
    shutil.copytree(out / "best", copy)
    meta = json.loads((copy / "adapter.json").read_text())
    text = "{% for m in messages %}{% if 'secret' in m['content'] %}{{ raise_exception('no secrets here') }}" \
           "{% endif %}{% endfor %}" + MARKED
    meta["chat_template"] = {"text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (copy / "adapter.json").write_text(json.dumps(meta))
    code, stdout, err = cli("chat", "--adapter", copy, "--interactive", "--temperature", "0", "--max-new-tokens", "4",
                            input_text="the secret\nHello there\n")
    assert code == 0, err
    assert "error: the chat template of " in err and "failed to render: no secrets here" in err
    from lora_gpt2.chat_template import ChatTemplate

    expected, _ = greedy_reply(net, ChatTemplate(text), [{"role": "user", "content": "Hello there"}], 4)
    assert stdout == expected + "\n"  # the refused message left no trace in the history


def test_a_peft_folder_carries_its_template_on_and_one_without_gets_the_default(chat_run, cli, tmp_path):
    out, _, _ = chat_run
    assert cli("export", out, tmp_path / "peft")[0] == 0
    assert cli("merge", tmp_path / "peft", tmp_path / "merged")[0] == 0  # the template travels on from PEFT
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())["chat_template"] == MARKED
    config = tmp_path / "peft" / "tokenizer_config.json"
    plain = {k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}
    config.write_text(json.dumps(plain))  # as other tools write it: a tokenizer, no template
    adapter = read_adapter(tmp_path / "peft")
    assert adapter.trained_template is None and adapter.chat_template.is_default
    code, _, err = cli("chat", "--adapter", tmp_path / "peft", "--one-shot", "--max-new-tokens", "2",
                       input_text="hi")
    assert code == 0, err
