"""Conversations as training data: the chat template's tokens against transformers', the
assistant-only mask against transformers' own assistant mask, the loss and its gradients against
plain PyTorch, truncation by whole turns, and every bad line named."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_gpt2 import chat_template, tokenizer
from lora_gpt2.chat_template import LEARN, ChatTemplate
from lora_gpt2.data import ensure_prepared, mask_prompt_for, train_batches
from lora_gpt2.data.batches import conversation_kept, open_index, open_tokens
from lora_gpt2.errors import DataError

from helpers import train_config

# a template written for transformers' assistant masks ({% generation %}): the independent reference
MARKED = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TALK = [{"role": "system", "content": "You speak as a king."},
        {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": "A friend, my liege. é ✓"},
        {"role": "user", "content": "Then speak <|endoftext|> plainly."},
        {"role": "assistant", "content": "I shall not.", "weight": 0},
        {"role": "user", "content": [{"type": "text", "text": "Why "}, {"type": "text", "text": "not?"}]},
        {"role": "assistant", "content": "Because the night is long."}]


def conversations(n=48):
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for t in range(1 + i % 4):
            messages.append({"role": "user", "content": f"Question {i}.{t}, " + "and more " * (i % 5)})
            messages.append({"role": "assistant", "content": f" Answer {i * t}" + " yes" * (1 + (i + t) % 7)})
        rows.append({"messages": messages})
    return rows


def short_conversations(n=12):
    """One exchange each (after a system message for every third): well under 64 tokens."""
    return [{"messages": r["messages"][: 3 if i % 3 == 0 else 2]} for i, r in enumerate(conversations(n))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("hf-tokenizer")
    shutil.copy(tokenizer.ASSETS / "encoder.json", d / "vocab.json")
    shutil.copy(tokenizer.ASSETS / "vocab.bpe", d / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(d))


def plain(messages):
    return chat_template.message_list(messages, "test", training=True)


@pytest.mark.parametrize("text", [chat_template.DEFAULT, MARKED])
def test_template_tokens_equal_transformers_apply_chat_template(hf_tokenizer, text):
    template = ChatTemplate(text)
    talk = plain(TALK)
    ids, _ = template.encode(talk)
    assert list(ids) == hf_tokenizer.apply_chat_template(talk, chat_template=text)["input_ids"]
    asked = talk[:3] + [{"role": "user", "content": "And now?"}]
    assert template.prompt(asked) == hf_tokenizer.apply_chat_template(
        asked, chat_template=text, add_generation_prompt=True)["input_ids"]
    assert tokenizer.EOT_ID in ids  # the eos text is the token, as transformers tokenizes it


def test_the_learned_tokens_are_transformers_assistant_mask(hf_tokenizer):
    talk = plain(TALK)
    ids, marks = ChatTemplate(MARKED).encode(talk)
    theirs = hf_tokenizer.apply_chat_template(talk, chat_template=MARKED, return_assistant_tokens_mask=True,
                                              return_dict=True)["assistant_masks"]
    weightless = [dict(m, weight=1) for m in talk]  # transformers knows no weights: every turn is marked
    _, all_marks = ChatTemplate(MARKED).encode(weightless)
    assert ((all_marks & LEARN) > 0).astype(int).tolist() == theirs
    # weight 0 takes exactly that turn out of the loss
    learned = tokenizer.decode([int(t) for t, m in zip(ids, marks) if m & LEARN])
    assert learned == "A friend, my liege. é ✓<|endoftext|>Because the night is long.<|endoftext|>"


def test_the_default_template_is_plain_role_markers_with_eot_after_each_answer():
    talk = plain(TALK[:3])
    template = ChatTemplate()
    assert template.render(talk) == ("System: You speak as a king.\n\nUser: Who goes there?\n\n"
                                     "Assistant: A friend, my liege. é ✓<|endoftext|>")
    assert template.render(talk[:2], add_generation_prompt=True).endswith("User: Who goes there?\n\nAssistant:")
    ids, marks = template.encode(talk)
    learned = tokenizer.decode([int(t) for t, m in zip(ids, marks) if m & LEARN])
    assert learned == " A friend, my liege. é ✓<|endoftext|>"


def test_assistant_only_loss_and_gradients_equal_a_plain_pytorch_reference(tiny_checkpoint, tmp_path, hf_tokenizer):
    from lora_gpt2.checkpoints.hf import load_pretrained
    from lora_gpt2.config import LoRAConfig

    torch.manual_seed(0)
    model = load_pretrained(tiny_checkpoint[0], lora=LoRAConfig(targets=("qkv_projection", "lm_head"), r=4),
                            dtype=torch.float32, device="cpu")
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.02)
    rows = short_conversations(12)
    path = write_jsonl(tmp_path / "talk.jsonl", rows)
    template_file = tmp_path / "marked.jinja"
    template_file.write_text(MARKED)
    prepared = ensure_prepared(path, _options(template_file))
    batches = train_batches(prepared, batch_size=4, block_size=63, seed=1, mask_prompt=True)
    batch = batches.get(0)
    trainable = [q for q in model.parameters() if q.requires_grad]
    ours = model(batch.x, targets=batch.y, reduction="sum") / batches.counted(0)
    grads = torch.autograd.grad(ours, trainable)

    # the reference: each drawn conversation tokenized by transformers, its assistant mask from
    # transformers, and the textbook cross-entropy over the masked targets
    total, count = 0.0, 0
    for i in batches._ids(0, 0).tolist():
        encoded = hf_tokenizer.apply_chat_template(_val_or_train(prepared, rows, i), chat_template=MARKED,
                                                   return_assistant_tokens_mask=True, return_dict=True)
        ids = torch.tensor(encoded["input_ids"])
        assert len(ids) <= 64  # short enough: no truncation in this test
        keep = torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool)
        logits = model(ids[None, :-1])[0]
        total = total + F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum")
        count += int(keep.sum())
    reference = total / count
    ref_grads = torch.autograd.grad(reference, trainable)
    assert count == batches.counted(0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _options(template_file):
    from lora_gpt2.data.formats import Options

    return Options(chat_template=chat_template.load(template_file).text)


def _val_or_train(prepared, rows, i):
    """Conversation i of the train split, as the JSONL gave it (weights removed: all are 1)."""
    member = np.zeros(len(rows), dtype=bool)
    member[np.random.default_rng(1337).permutation(len(rows))[: max(1, round(len(rows) * 0.1))]] = True
    train = [r for r, val in zip(rows, member) if not val]
    return train[i]["messages"]


def _marks_of(lengths, system=0, roles=None):
    """Marks of a conversation of messages with these token counts (the first `system` long)."""
    marks = []
    for k, n in enumerate(lengths):
        role = (roles or [])[k] if roles else ("assistant" if k % 2 else "user")
        row = [0] * n
        row[0] |= chat_template.MESSAGE | (chat_template.ASSISTANT if role == "assistant" else 0)
        if role == "assistant":
            row = [m | LEARN for m in row]
        if k == 0 and system:
            row = [m | chat_template.SYSTEM for m in row]
        marks += row
    return np.array(marks, dtype=np.uint8)


def test_over_long_conversations_lose_whole_earliest_turns_never_the_system_or_last_answer():
    marks = _marks_of([5, 4, 6, 3, 7, 2])  # user, assistant, ... : 27 tokens
    assert conversation_kept(marks, 27) == [(0, 27)]
    assert conversation_kept(marks, 26) == [(5, 27)]  # the first user turn goes, whole
    assert conversation_kept(marks, 22) == [(5, 27)]
    assert conversation_kept(marks, 21) == [(9, 27)]  # the fewest whole messages that fit
    assert conversation_kept(marks, 18) == [(9, 27)]
    assert conversation_kept(marks, 17) == [(15, 27)]  # a cut may start with an answer
    assert conversation_kept(marks, 11) == [(18, 27)]  # the last question and its answer
    assert conversation_kept(marks, 9) == [(18, 27)]
    assert conversation_kept(marks, 5) == [(22, 27)]  # the question loses its start, the answer is whole
    assert conversation_kept(marks, 1) == [(25, 26)]  # an answer longer than the window loses its end
    sys_marks = _marks_of([3, 5, 4, 6, 2], system=3, roles=["system", "user", "assistant", "user", "assistant"])
    assert conversation_kept(sys_marks, 19) == [(0, 3), (8, 20)]  # the system stays, the first question goes
    assert conversation_kept(sys_marks, 11) == [(0, 3), (12, 20)]
    assert conversation_kept(sys_marks, 8) == [(12, 20)]  # no room for it: the system goes too
    assert conversation_kept(sys_marks, 7) == [(13, 20)]


def test_training_rows_of_a_cut_conversation_keep_the_system_and_say_how_many_turns_went(tmp_path, tiny_checkpoint):
    from lora_gpt2.training import distributed, factory

    rows = conversations(48)
    path = write_jsonl(tmp_path / "talk.jsonl", rows)
    cfg = train_config(tiny_checkpoint[0], path, tmp_path / "run", block_size=40, batch_size=4)
    run = factory.build(cfg, distributed.setup("cpu"), "no")
    try:
        notice = [n.message for n in run.notices if "conversations" in n.message]
        batches = run.batches
        assert notice and re.match(rf"{batches.truncated()} of 43 train conversations are longer than --block-size "
                                   rf"40 \+ 1 tokens: {batches.dropped_messages()} of their earliest messages",
                                   notice[0])
        assert batches.truncated() > 5 and batches.dropped_messages() > batches.truncated()
        tokens, index, marks = batches.tokens, batches.index, batches.marks
        for i in np.flatnonzero(index[:, 2] > 41)[:10]:
            start, _, n = index[i]
            x, y = batches._rows(index[i : i + 1])
            kept = conversation_kept(np.asarray(marks[start : start + n]), 41)
            text = tokenizer.decode(np.concatenate([tokens[start + a : start + b] for a, b in kept]).tolist())
            whole = tokenizer.decode(tokens[start : start + n].tolist())
            assert whole.endswith(text[-20:])  # the last answer is whole
            assert text.startswith("System: Be brief.") == whole.startswith("System: Be brief.")
            assert int((y >= 0).sum()) == int(((np.concatenate([marks[start + a : start + b] for a, b in kept])[1:]
                                                & LEARN) > 0).sum())
    finally:
        run.lock.release()


def test_train_on_all_counts_every_target_and_mask_prompt_is_refused(tmp_path):
    prepared = ensure_prepared(write_jsonl(tmp_path / "talk.jsonl", conversations(12)))
    assert prepared.chat and prepared.mask_path("train").stat().st_size == prepared.train_tokens
    every = train_batches(prepared, batch_size=4, block_size=63, seed=1, mask_prompt=False)
    learned = train_batches(prepared, batch_size=4, block_size=63, seed=1, mask_prompt=True)
    drawn = every.index[every._ids(0, 0)]
    assert every.counted(0) == sum(sum(b - a for a, b in conversation_kept(np.asarray(every.marks[s : s + n]), 64)) - 1
                                   for s, _, n in drawn.tolist())
    assert 0 < learned.counted(0) < every.counted(0)
    assert mask_prompt_for(prepared, None, None) is True and mask_prompt_for(prepared, None, "all") is False
    with pytest.raises(ValueError, match=r"--mask-prompt is for prompt/completion data; .*talk.jsonl is chat data"):
        mask_prompt_for(prepared, True, None)
    text = ensure_prepared(write_jsonl(tmp_path / "text.jsonl", [{"text": "a b"}, {"text": "c d"}]))
    with pytest.raises(ValueError, match=r"--train-on is for chat data; .*text.jsonl is examples data"):
        mask_prompt_for(text, None, "all")


BAD = [
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}',
     r"line 1: messages\[0\] has no 'role'"),
    ('{"messages": [{"role": "user"}]}', r"line 1: messages\[0\] has no 'content'"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}',
     r"line 1: messages\[0\]: unknown role 'narrator' \(roles: system, user, assistant\)"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     r"line 1: messages\[0\]: 'content' must be a string or a list of text parts, got int"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     r"line 1: messages\[0\]: content\[0\] must be a text part"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"line 1: no assistant message: nothing to learn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}',
     r"line 1: the conversation ends with a user message; training needs it to end with the assistant's answer"),
    ('{"messages": []}', r"line 1: 'messages' is empty"),
    ('{"messages": "hello"}', r"line 1: 'messages' must be a list, got str"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}',
     r"line 1: messages\[1\]: 'weight' must be 0 or 1 on an assistant message, got 2"),
    ('{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}',
     r"'weight' must be 0 or 1 on an assistant message, got 0 on a user message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"text": "x"}',
     r"line 3: mixed formats: this line is text but the first line set chat \(messages\)"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_conversations_get_one_line_naming_file_line_and_field(tmp_path, cli, line, message):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    path = tmp_path / "talk.jsonl"
    path.write_text(good + line + "\n" if "mixed" in message else line + "\n" + good)
    with pytest.raises(DataError, match=message):
        ensure_prepared(path)
    code, _, err = cli("train", "--model", tmp_path / "no-model", "--data", path, "--out", tmp_path / "run")
    assert code == 1 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.jsonl"]  # nothing half-written


def test_template_faults_are_one_line(tmp_path, cli):
    path = write_jsonl(tmp_path / "talk.jsonl", conversations(4))
    failing = tmp_path / "fails.jinja"
    failing.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system "
                       "messages here') }}{% endif %}{{ m.content }}{% endfor %}")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    for args, message in [
        (("--chat-template", failing), r"talk.jsonl line 1: the chat template failed to render: no system "
                                       r"messages here"),
        (("--chat-template", broken), r"broken.jinja: the chat template does not parse: line 1: "),
        (("--chat-template", tmp_path / "missing.jinja"), r"chat template file '.*missing.jinja' not found"),
        (("--train-on", "some"), r"train_on must be one of assistant, all; got 'some'"),
    ]:
        code, _, err = cli("train", "--model", tmp_path / "no-model", "--data", path, "--out", tmp_path / "run",
                           *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    text = tmp_path / "plain.txt"
    text.write_text("hello there\n" * 50)
    code, _, err = cli("train", "--model", tmp_path / "no-model", "--data", text, "--out", tmp_path / "run2",
                       "--chat-template", failing)
    assert code == 1 and re.search(r"--chat-template is for chat data .*plain.txt is text data", err), err


def test_a_template_of_its_own_names_its_files_and_is_prepared_apart(tmp_path):
    path = write_jsonl(tmp_path / "talk.jsonl", conversations(8))
    default = ensure_prepared(path)
    template_file = tmp_path / "marked.jinja"
    template_file.write_text(MARKED)
    other = ensure_prepared(path, _options(template_file))
    assert default.train != other.train and default.train.name == "talk.train.bin"
    assert open_tokens(default.train).tolist() != open_tokens(other.train).tolist()
    assert ensure_prepared(path).meta == default.meta  # each found again, not rebuilt
    assert len(open_index(other.index_path("train"))) == default.examples("train")


def test_packed_conversations_give_each_exactly_what_it_gets_alone(tiny_checkpoint, tmp_path):
    from lora_gpt2.checkpoints.hf import load_pretrained
    from lora_gpt2.config import LoRAConfig
    from lora_gpt2.data import example_rows

    prepared = ensure_prepared(write_jsonl(tmp_path / "talk.jsonl", short_conversations(40)))
    packed = train_batches(prepared, batch_size=2, block_size=63, seed=0, mask_prompt=True, packing=True)
    batch = packed.get(0)
    assert int(batch.segments.max()) >= 2
    ids = [i for row in packed._step_rows(0, 0) for i in row]
    torch.manual_seed(0)
    model = load_pretrained(tiny_checkpoint[0], lora=LoRAConfig(targets=("qkv_projection",), r=4),
                            dtype=torch.float32, device="cpu")
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours = model(batch.x, targets=batch.y, reduction="sum", segments=batch.segments)
    x, y = example_rows(packed.tokens, packed.index[ids], 64, True, packed.marks)
    alone = model(x, targets=y, reduction="sum")
    assert int((batch.y >= 0).sum()) == int((y >= 0).sum()) == packed.counted(0)
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(ours, trainable), torch.autograd.grad(alone, trainable)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_worked_chat_example_runs_end_to_end(tiny_checkpoint, tmp_path):
    """scripts/shakespeare_to_chat.py -> train -> eval -> chat, as the README shows it."""
    import subprocess
    import sys

    from helpers import ROOT, SAMPLE_TEXT, cli_command, subprocess_env

    play = tmp_path / "input.txt"
    play.write_text(SAMPLE_TEXT)
    talks = tmp_path / "talks"
    done = subprocess.run([sys.executable, ROOT / "scripts" / "shakespeare_to_chat.py", play, talks],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first = json.loads((talks / "train.jsonl").read_text().splitlines()[0])["messages"]
    assert first[0] == {"role": "system", "content": "You are Juliet. Answer in Shakespeare's verse."}
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"].startswith("What say you, Juliet?")
    assert first[2]["content"].startswith("What say you, Romeo?")
    run = tmp_path / "run"
    for args in (["train", "--model", tiny_checkpoint[0], "--data", talks, "--out", run, "--max-steps", "3",
                  "--block-size", "63", "--batch-size", "4", "--device", "cpu", "--eval-interval", "3"],
                 ["eval", "--adapter", run, "--device", "cpu", "--json"]):
        done = subprocess.run(cli_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "chat"
    done = subprocess.run(cli_command("chat", "--adapter", run, "--device", "cpu", "--max-new-tokens", "5"),
                          input="What say you?", env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.endswith("\n") and done.stdout.strip(), done.stderr
