"""fastce.hf: a patched transformers causal LM trains exactly as the unpatched one.

Tiny random-initialized models of each family, built here (no downloads); every comparison is
against the same model unpatched, on the same fresh inputs.
"""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fastce.hf  # noqa: E402  (transformers is optional: skip the module without it)

V = 263  # vocabulary: no power of two, so chunks and SIMD tails are ragged
T = 12  # tokens per sequence
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               initializer_range=0.2, **IDS)  # logits of order 1: softcaps and scales matter

# family: (config class, model class, config arguments). Softcaps, scales and tying as set here
# are read from the config by fastce.hf; a wrong reading would change the loss.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(DECODER, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(DECODER, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8)),
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                       dict(DECODER, head_dim=8, final_logit_softcapping=0.7)),
    "gemma3_softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(DECODER, head_dim=8, final_logit_softcapping=0.7)),
    "cohere_scale": ("CohereConfig", "CohereForCausalLM", dict(DECODER, logit_scale=0.25)),
    "granite_scaling": ("GraniteConfig", "GraniteForCausalLM", dict(DECODER, logits_scaling=0.2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER),
    "phi_head_bias": ("PhiConfig", "PhiForCausalLM", DECODER),
    "gpt2_tied": ("GPT2Config", "GPT2LMHeadModel",
                  dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                       **IDS)),
}


def build(family, seed=0):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).train()


_MODELS = {}


@pytest.fixture
def model(request):
    """The family's model (built once), unpatched again after the test whatever happens."""
    family = request.param
    if family not in _MODELS:
        _MODELS[family] = build(family)
    m = _MODELS[family].train()
    yield m
    if getattr(m, "_fastce_hf", None) is not None:
        fastce.hf.unpatch(m)


def batch(seed, case="labels", batch_size=2):
    """Fresh inputs; some labels -100 (a padded prompt, a padded tail)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch_size, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, -3:] = -100
    kwargs = dict(input_ids=ids, labels=labels)
    if case == "shift_labels":  # not labels shifted: the loss must follow these
        shift = torch.randint(0, V, (batch_size, T), generator=g)
        shift[:, -1] = -100
        shift[0, :2] = -100
        kwargs["shift_labels"] = shift
    elif case == "num_items_in_batch":  # the Trainer's count over all accumulated batches
        kwargs["num_items_in_batch"] = torch.tensor(3 * int((labels[:, 1:] != -100).sum()))
    elif case == "logits_to_keep":  # loss over the last 5 positions, their labels
        kwargs["logits_to_keep"] = 5
        kwargs["labels"] = labels[:, -5:]
    elif case == "logits_to_keep_positions":  # the same positions in every row
        kwargs["logits_to_keep"] = torch.tensor([1, 4, 5, 9])
        kwargs["labels"] = labels[:, [1, 4, 5, 9]]
    elif case == "logits_to_keep_mask":  # per-row positions (packed rows): flattened
        mask = torch.zeros(batch_size, T, dtype=torch.bool)
        mask[0, 2:9] = mask[-1, 5:] = True
        kwargs["logits_to_keep"] = mask
        kwargs["labels"] = labels[mask]
    return kwargs


def loss_and_grads(model, kwargs):
    torch.manual_seed(1)  # dropout, where a family has some, draws the same masks
    out = model(**kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


def assert_grads_close(got, want, rtol):
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            # rtol of the tensor's scale for entries near zero (sums in another order)
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * 5e-2 * w.abs().max().item())


def assert_patched_matches(model, kwargs, rtol=2e-5, **options):
    want_out, want = loss_and_grads(model, kwargs)
    fastce.hf.patch(model, **options)
    got_out, got = loss_and_grads(model, kwargs)
    fastce.hf.unpatch(model)
    assert type(got_out) is type(want_out)
    torch.testing.assert_close(got_out.loss, want_out.loss, rtol=rtol, atol=0)
    assert_grads_close(got, want, rtol)
    return got_out, want_out


CASES = ["labels", "shift_labels", "num_items_in_batch", "logits_to_keep",
         "logits_to_keep_positions", "logits_to_keep_mask"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model", list(FAMILIES), indirect=True)
def test_loss_and_every_gradient_equal_unpatched(model, case):
    got, want = assert_patched_matches(model, batch(seed=len(case), case=case))
    assert got.logits is None and want.logits is not None


def test_the_families_exercise_what_they_stand_for():
    """Softcap, scales, tying and the head bias are really there (else the tests above prove
    less than they say)."""
    assert fastce.hf._logit_transform(build("gemma2_softcap").config) == (1.0, 0.7)
    assert fastce.hf._logit_transform(build("gemma3_softcap").config) == (1.0, 0.7)
    assert fastce.hf._logit_transform(build("cohere_scale").config) == (0.25, None)
    assert fastce.hf._logit_transform(build("granite_scaling").config) == (1 / 0.2, None)
    for family in ("qwen2_tied", "gpt2_tied", "gemma2_softcap"):
        m = build(family)
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert build("phi_head_bias").lm_head.bias is not None
    logits = build("gemma2_softcap")(**batch(0)).logits
    assert logits.abs().max() > 0.5  # the 0.7 cap bends these logits


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_patch_returns_the_model_and_unpatch_restores_it(model):
    forward = model.forward
    assert fastce.hf.patch(model) is model
    # The Trainer and generate() read which arguments the forward takes.
    assert inspect.signature(model.forward) == inspect.signature(forward)
    assert model(**batch(0)).logits is None
    assert fastce.hf.unpatch(model) is model
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert "_loss_function" not in model.__dict__
    assert model.forward == forward
    out = model(**batch(0))
    assert out.logits.shape == (2, T, V) and out.loss is not None


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_options_follow_fastce_semantics(model):
    """label_smoothing and z-loss, against torch on the unpatched model's logits."""
    kwargs = batch(3)
    torch.manual_seed(1)
    logits = model(input_ids=kwargs["input_ids"]).logits.reshape(-1, V)
    target = F.pad(kwargs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    valid = target != -100
    z_loss = 1e-2 * torch.logsumexp(logits[valid], dim=-1).pow(2).mean()
    want = F.cross_entropy(logits, target, label_smoothing=0.1) + z_loss
    params = list(model.parameters())
    want_grads = torch.autograd.grad(want, params)
    fastce.hf.patch(model, label_smoothing=0.1, lse_square_scale=1e-2, chunk_size=7)
    got = model(**kwargs).loss
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    assert_grads_close(got_grads, want_grads, 2e-5)


@pytest.mark.parametrize("model", ["gemma2_softcap", "gpt2_tied"], indirect=True)
def test_keep_logits_returns_the_models_logits(model):
    kwargs = batch(4, "num_items_in_batch")
    got, want = assert_patched_matches(model, kwargs, keep_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_tuple_outputs_lose_only_the_logits(model):
    kwargs = dict(batch(5), return_dict=False, use_cache=False)
    want = model(**kwargs)
    fastce.hf.patch(model)
    got = model(**kwargs)
    assert isinstance(got, tuple) and len(got) == len(want) - 1
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=0)


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_positional_labels(model):
    kwargs = batch(6)
    args = (kwargs["input_ids"], None, None, None, None, kwargs["labels"])  # LlamaForCausalLM's order
    want = model(*args).loss
    fastce.hf.patch(model)
    got = model(*args)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=2e-5, atol=0)


def test_gradient_checkpointing():
    m = build("llama")
    m.gradient_checkpointing_enable()
    assert_patched_matches(m, batch(12, "num_items_in_batch"))


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_autocast_bfloat16_close_to_unpatched(model):
    """Under autocast the head computes in bfloat16, as nn.Linear would."""
    kwargs = batch(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, want = loss_and_grads(model, kwargs)
        fastce.hf.patch(model)
        got_out, got = loss_and_grads(model, kwargs)
    assert got_out.logits is None
    torch.testing.assert_close(got_out.loss, want_out.loss, rtol=1e-2, atol=0)
    head = dict(zip((n for n, _ in model.named_parameters()), range(len(want))))["lm_head.weight"]
    cos = F.cosine_similarity(got[head].flatten(), want[head].flatten(), dim=0)
    assert cos > 0.999


def test_deep_copy_of_a_patched_model_is_patched_on_its_own():
    m = fastce.hf.patch(build("llama"))
    c = copy.deepcopy(m)
    assert c.forward.__self__ is c and c.lm_head._fastce_hf is c._fastce_hf
    assert c._fastce_hf.head is c.lm_head
    assert c(**batch(8)).logits is None
    fastce.hf.unpatch(c)
    assert c(**batch(8)).logits is not None and m(**batch(8)).logits is None


def adamw_losses(model, autocast=False, steps=20):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch(100 + step % 4, batch_size=4)).loss  # 4 batches, 5 times each
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


# float32: every loss within 1e-6. The final parameters within 1e-5 (0.05% of the lr * steps
# they move): AdamW divides each gradient entry by its running RMS, so the float32 rounding
# of entries that are sums with cancellation (a few 1e-6 relative, whatever the summation
# order) moves single parameters by up to ~5e-6 after 20 steps. bfloat16 (autocast, float32
# weights, as the Trainer's bf16=True): losses within 1%, parameters within 1e-2.
@pytest.mark.parametrize("autocast,loss_tol,param_tol", [(False, 1e-6, 1e-5), (True, 1e-2, 1e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma2_softcap"])
def test_20_adamw_steps_match_unpatched(family, autocast, loss_tol, param_tol):
    want_losses, want = adamw_losses(build(family), autocast)
    got_losses, got = adamw_losses(fastce.hf.patch(build(family)), autocast)
    if autocast:
        torch.testing.assert_close(got_losses, want_losses, rtol=loss_tol, atol=0)
    else:
        torch.testing.assert_close(got_losses, want_losses, rtol=0, atol=loss_tol)
    for (name, g), w in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(g, w, rtol=0, atol=param_tol, msg=name)
    assert sum(want_losses[-4:]) < sum(want_losses[:4]) - 0.5  # it learnt


@pytest.mark.parametrize("family", ["llama", "gemma2_softcap", "granite_scaling"])
def test_bfloat16_weights_close_to_unpatched(family):
    """A model held in bfloat16: the same loss and gradients up to bfloat16 rounding."""
    m = build(family).to(torch.bfloat16)
    kwargs = batch(11)
    want_out, want = loss_and_grads(m, kwargs)
    fastce.hf.patch(m)
    got_out, got = loss_and_grads(m, kwargs)
    torch.testing.assert_close(got_out.loss, want_out.loss, rtol=1e-2, atol=0)
    for (name, _), g, w in zip(m.named_parameters(), got, want):
        cos = F.cosine_similarity(g.float().flatten(), w.float().flatten(), dim=0)
        assert cos > 0.999, name


class _Sequences(torch.utils.data.Dataset):
    """Sequences with padded prompts and tails of different lengths, so that batches hold
    different numbers of targets (what num_items_in_batch is for)."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            ids = torch.randint(3, V, (T,), generator=g)
            labels = ids.clone()
            labels[: i % 5] = -100
            labels[T - i % 3:] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trainer_run(model, tmp_path):
    pytest.importorskip("accelerate")  # the Trainer needs it
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, gradient_accumulation_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sequences())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    return losses, [p.detach().clone() for p in model.parameters()]


def lora(model):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_trainer_logs_the_same_losses(adapter, tmp_path):
    wrap = lora if adapter else (lambda m: m)
    want_losses, want = trainer_run(wrap(build("llama")), tmp_path / "unpatched")
    patched = fastce.hf.patch(wrap(build("llama")))
    got_losses, got = trainer_run(patched, tmp_path / "patched")
    assert patched.train()(**batch(0)).logits is None  # the Trainer ran the patched forward
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_patch_then_wrap_with_lora():
    want_out, want = loss_and_grads(lora(build("llama")), batch(13, "num_items_in_batch"))
    wrapped = lora(fastce.hf.patch(build("llama")))
    got_out, got = loss_and_grads(wrapped, batch(13, "num_items_in_batch"))
    assert got_out.logits is None
    torch.testing.assert_close(got_out.loss, want_out.loss, rtol=2e-5, atol=0)
    assert_grads_close(got, want, 2e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_torch_compile(model, backend):
    """One graph, no break (fullgraph=True), and the same loss and gradients."""
    kwargs = batch(9, "num_items_in_batch")
    want_out, want = loss_and_grads(model, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(fastce.hf.patch(model), backend=backend, fullgraph=True)
    got_out, got = loss_and_grads(compiled, kwargs)
    assert got_out.logits is None
    torch.testing.assert_close(got_out.loss, want_out.loss, rtol=2e-5, atol=0)
    assert_grads_close(got, want, 2e-5)


@pytest.mark.parametrize("model", ["llama", "gemma2_softcap", "gpt2_tied"], indirect=True)
def test_eval_mode_and_generate_unchanged(model):
    kwargs = batch(10)
    prompt = kwargs["input_ids"][:, :5]

    def outputs():
        model.eval()
        with torch.no_grad():
            evaluated = model(**kwargs)
            tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        model.train()
        with torch.no_grad():
            unlabelled = model(input_ids=kwargs["input_ids"]).logits
        return evaluated.loss, evaluated.logits, tokens, unlabelled

    want = outputs()
    fastce.hf.patch(model)
    got = outputs()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ---- bad use ----------------------------------------------------------------------------------


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="expects a transformers causal LM"):
        fastce.hf.patch(torch.nn.Linear(2, 2))
    llama = transformers.LlamaConfig(**DECODER)
    with pytest.raises(TypeError, match="no output embeddings"):
        fastce.hf.patch(transformers.LlamaModel(llama))
    with pytest.raises(TypeError, match="not a causal LM"):
        fastce.hf.patch(transformers.LlamaForSequenceClassification(llama))
    bert = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)
    with pytest.raises(TypeError, match="not a causal LM"):
        fastce.hf.patch(transformers.BertForMaskedLM(bert))


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_patch_twice_and_unpatch_unpatched(model):
    with pytest.raises(RuntimeError, match="is not patched"):
        fastce.hf.unpatch(model)
    fastce.hf.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fastce.hf.patch(model)


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_bad_options(model):
    with pytest.raises(TypeError, match="unknown options"):
        fastce.hf.patch(model, label_smothing=0.1)
    with pytest.raises(TypeError, match="come from the model's config"):
        fastce.hf.patch(model, softcap=30.0)
    with pytest.raises(TypeError, match="chunk_size"):
        fastce.hf.patch(model, keep_logits=True, chunk_size=8)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fastce.hf.patch(model, label_smoothing=2.0)
    assert "forward" not in model.__dict__  # nothing was patched by the failed calls


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_heads_it_cannot_compute(model):
    class Quantized(torch.nn.Linear):
        pass

    head = model.lm_head
    model.lm_head = Quantized(32, V, bias=False)
    try:
        with pytest.raises(ValueError, match="not a torch.nn.Linear"):
            fastce.hf.patch(model)
    finally:
        model.lm_head = head
    with pytest.raises(ValueError, match="LoRA"):
        peft = pytest.importorskip("peft")
        fastce.hf.patch(peft.get_peft_model(build("llama"), peft.LoraConfig(
            r=2, target_modules=["lm_head"], task_type="CAUSAL_LM")))


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_head_replaced_after_patch(model):
    fastce.hf.patch(model)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(32, V, bias=False)
    try:
        with pytest.raises(RuntimeError, match="were replaced after patch"):
            model(**batch(0))
    finally:
        model.lm_head = head


def test_transform_the_config_does_not_describe():
    """A scale in the config that Llama's forward does not apply: the probe sees it."""
    config = transformers.LlamaConfig(**DECODER)
    config.logit_scale = 2.0
    m = fastce.hf.patch(transformers.LlamaForCausalLM(config))
    with pytest.raises(RuntimeError, match="transforms the logits in a way"):
        m(**batch(0))


def test_a_forward_that_computes_its_own_loss():
    class OwnLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            return transformers.modeling_outputs.CausalLMOutput(loss=logits.square().mean(),
                                                                logits=logits)

    m = fastce.hf.patch(OwnLoss(transformers.LlamaConfig(**DECODER)))
    with pytest.raises(RuntimeError, match="called self.loss_function 0 times"):
        m(**batch(0))


@pytest.mark.parametrize("model", ["llama", "gemma2_softcap"], indirect=True)
@pytest.mark.parametrize("keep_logits", [False, True])
def test_token_accuracy_passes_through(model, keep_logits):
    """return_token_accuracy: the training output's token_accuracy is the argmax accuracy of the
    unpatched model's logits over the non-ignored shifted labels; the loss is unchanged."""
    kwargs = batch(6)
    with torch.no_grad():
        want = model(**kwargs)
    target = F.pad(kwargs["labels"], (0, 1), value=-100)[:, 1:]
    valid = target != -100
    accuracy = (want.logits.argmax(-1) == target)[valid].double().mean()
    fastce.hf.patch(model, return_token_accuracy=True, keep_logits=keep_logits)
    with torch.no_grad():
        got = model(**kwargs)
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-5, atol=0)
    torch.testing.assert_close(got.token_accuracy.double(), accuracy)
    model.eval()
    with torch.no_grad():
        assert "token_accuracy" not in model(input_ids=kwargs["input_ids"])  # no labels: unchanged
