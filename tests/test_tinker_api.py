"""The gateway's Tinker-compatible API driven by the official `tinker` SDK (the pinned test
extra), against a live trainer, sampler and gateway: a LoRA training run made, trained
with cross_entropy (its loss falls), its weights sampled with token ids and logprobs
exactly as Headway's own Sample gives them for the same checkpoint and seed."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from headway.tensors import from_tensor, to_tensor
from headway.v1 import common_pb2, sampling_pb2


@pytest.fixture
def service(gateway_stack, monkeypatch):
    """A ServiceClient on the stack's gateway (its own telemetry off: nothing leaves)."""
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    base_url = gateway_stack.gateway.http_url.removesuffix("/v1")
    client = tinker.ServiceClient(base_url=base_url, api_key="tml-local")
    yield client
    client.close("success").result()


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_sdk_trains_a_lora_run_and_samples_it(gateway_stack, service):
    caps = service.get_server_capabilities()
    assert "tiny" in [m.model_name for m in caps.supported_models]
    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    info = tc.get_info()
    assert info.model_data.model_name == "tiny" and info.is_lora and info.lora_rank == 4
    tok = tc.get_tokenizer()  # the base's own tokenizer directory, offline
    tokens = tok.encode("12 + 30 = 42")
    data = [datum(tokens)]
    losses = []
    for _ in range(4):  # pipelined: both submitted before either result is awaited
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=3e-2))
        out = fb.result()
        step.result()
        lps = out.loss_fn_outputs[0]["logprobs"].to_numpy()
        assert lps.shape == (len(tokens) - 1,)
        np.testing.assert_allclose(out.metrics["loss:sum"], -lps.sum(), rtol=1e-5)
        losses.append(out.metrics["loss:sum"])
    assert losses[-1] < losses[0], losses

    sampler = tc.save_weights_and_get_sampling_client()
    prompt = tokens[:4]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    got = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result()
    assert len(got.sequences) == 2
    # Every optim_step is a checkpoint of the run's fork; the sampler serves its head.
    slug = next(m.slug for m in gateway_stack.gateway.gateway.visible_models("")
                if m.slug.startswith("tk-"))  # fmt: skip
    store = gateway_stack.gateway.gateway.store
    assert len(store.list_checkpoints(slug)) == 1 + 4
    ours = gateway_stack.gateway.sampling.Sample(sampling_pb2.SampleRequest(
        model=slug, checkpoint=store.head(slug),
        prompt_tokens=to_tensor(np.array(prompt, np.int32)),
        params=common_pb2.SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=7),
    ))  # fmt: skip
    for seq, want in zip(got.sequences, ours.sequences, strict=True):
        assert seq.tokens == from_tensor(want.tokens, "tokens").tolist()
        np.testing.assert_array_equal(
            np.array(seq.logprobs, np.float32), from_tensor(want.logprobs, "logprobs")
        )


def test_sdk_gets_its_own_errors_for_bad_input(service):
    """An unknown base fails the run's creation as a user error (not retried, not a hang);
    a loss Headway does not have is refused at submission with a 400 naming the ones it
    has; an image chunk (Headway's bases read text) likewise."""
    with pytest.raises(tinker.RequestFailedError, match="no-such-base") as failed:
        service.create_lora_training_client(base_model="no-such-base", rank=4).result()
    assert failed.value.category == types.RequestErrorCategory.User
    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    data = [datum([3, 4, 5, 6])]
    with pytest.raises(tinker.BadRequestError, match="Headway has cross_entropy"):
        tc.forward_backward(data, "gspo").result()
    image = types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png")]),
        loss_fn_inputs={"target_tokens": [1]},
    )
    with pytest.raises(tinker.BadRequestError, match="only encoded text"):
        tc.forward_backward([image], "cross_entropy").result()
    sampler = service.create_sampling_client(base_model="tiny").result()
    with pytest.raises(
        tinker.BadRequestError, match=r"topk_prompt_logprobs: a number in \[0, 20\]"
    ):
        sampler.sample(types.ModelInput.from_ints([3, 4]), 1, types.SamplingParams(max_tokens=2),
                       include_prompt_logprobs=True, topk_prompt_logprobs=21).result()  # fmt: skip
    with pytest.raises(tinker.BadRequestError, match="stable_reinforce"):
        tc.forward_backward(data, "stable_reinforce").result()
    with pytest.raises(tinker.BadRequestError, match="cross_entropy"):
        tc.forward(data, "importance_sampling").result()
    with pytest.raises(tinker.TinkerError, match="train_mlp"):
        service.create_lora_training_client(base_model="tiny", rank=4, train_mlp=False).result()
    state = tc.save_state("bad-input").result().path
    with pytest.raises(tinker.TinkerError, match="load_state_with_optimizer"):
        tc.load_state(state).result()
    # The run still trains after the refusals.
    assert "loss:sum" in tc.forward_backward(data, "cross_entropy").result().metrics


def test_rl_losses_take_their_loss_fn_config_through_the_sdk(service):
    """ppo, cispo and dro with `loss_fn_config` through the SDK: each loss is the formula
    with the configured clip thresholds (or beta), not the defaults, on the policy's own
    logprobs (ratios e^±0.4 sit outside both the configured and the default clips)."""
    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    tokens = [3, 4, 5, 6, 7, 8]
    lp = tc.forward([datum(tokens)], "cross_entropy").result().loss_fn_outputs[0]
    lp = lp["logprobs"].to_numpy().astype(np.float64)
    q = lp + np.linspace(-0.4, 0.4, len(lp))  # the sampler's logprobs: ratio = e^(lp - q)
    adv = np.array([1.0, -1.0, 0.5, -0.5, 1.0])
    data = [types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": q.tolist(),
                        "advantages": adv.tolist()},
    )]  # fmt: skip
    ratio = np.exp(lp - q)

    def ppo(lo: float, hi: float) -> float:
        return float(-np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv).sum())

    def cispo(lo: float, hi: float) -> float:
        return float(-(np.clip(ratio, lo, hi) * adv * lp).sum())

    def dro(beta: float) -> float:
        return float(-(adv * lp - 0.5 * beta * (lp - q) ** 2).sum())

    clip = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    for loss, config, want, default in (
        ("ppo", clip, ppo(0.9, 1.1), ppo(0.8, 1.2)),
        ("cispo", clip, cispo(0.9, 1.1), cispo(0.8, 1.2)),
        ("dro", {"beta": 0.5}, dro(0.5), dro(0.05)),
    ):
        out = tc.forward_backward(data, loss, loss_fn_config=config).result()
        got = out.metrics["loss:sum"]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (loss, got, want)
        assert abs(want - default) > 1e-3  # the config mattered
    with pytest.raises(tinker.RequestFailedError, match="no_such_key") as failed:
        tc.forward_backward(data, "ppo", loss_fn_config={"no_such_key": 1.0}).result()
    assert failed.value.category == types.RequestErrorCategory.User


def test_one_teams_runs_and_futures_are_not_found_to_another(secured_stack, monkeypatch):
    """Headway keys, sent as tml-<key>: red's run, its sampler weights and its futures are
    NOT_FOUND to blue, through the SDK and on the wire; a key that is not one is 401."""
    import httpx

    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    base_url = secured_stack.gateway.http_url.removesuffix("/v1")
    red = tinker.ServiceClient(base_url=base_url, api_key="tml-" + secured_stack.keys["red"])
    blue = tinker.ServiceClient(base_url=base_url, api_key="tml-" + secured_stack.keys["blue"])
    try:
        tc = red.create_lora_training_client(base_model="tiny", rank=4).result()
        tc.forward_backward([datum([3, 4, 5, 6])], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = tc.save_weights_for_sampler("red-1").result().path
        red.create_sampling_client(model_path=path).result()  # red may
        with pytest.raises(tinker.NotFoundError):
            blue.create_sampling_client(model_path=path).result()
        export = tc.save_weights_external("red-e").result().path
        assert red.create_rest_client().get_external_weights_urls(export).result().urls
        with pytest.raises(tinker.NotFoundError):
            blue.create_rest_client().get_external_weights_urls(export).result()

        def post(key: str, route: str, body: dict) -> httpx.Response:
            headers = {"X-API-Key": "tml-" + key}
            return httpx.post(f"{base_url}/api/v1/{route}", json=body, headers=headers)

        run = tc.model_id
        assert post(secured_stack.keys["red"], "get_info", {"model_id": run}).status_code == 200
        blue_key = secured_stack.keys["blue"]
        assert post(blue_key, "get_info", {"model_id": run}).status_code == 404
        step = post(blue_key, "optim_step", {"model_id": run, "seq_id": 99,
                                              "adam_params": {"learning_rate": 1.0}})  # fmt: skip
        assert step.status_code == 404
        mine = post(secured_stack.keys["red"], "optim_step", {"model_id": run, "seq_id": 100,
                    "adam_params": {"learning_rate": 1e-3}}).json()["request_id"]  # fmt: skip
        assert post(blue_key, "retrieve_future", {"request_id": mine}).status_code == 404
        assert post("hw_not-a-key", "create_session", {}).status_code == 401
    finally:
        red.close("success").result()
        blue.close("success").result()


def test_custom_loss_gives_the_builtin_losss_weights(gateway_stack, service):
    """forward_backward_custom with cross-entropy written in torch against the SDK's types
    (forward: the replicas' logprobs; backward: the SDK's −dloss/dlogprob as weights) makes
    the same adapter as the built-in cross_entropy from the same checkpoint (the run's
    head set back to it between the two, as Headway's tree allows)."""
    import torch

    from headway.v1 import model_pb2
    from tests.helpers_training import checkpoint_tensors

    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    slug = next(m.slug for m in gateway_stack.gateway.gateway.visible_models("")
                if m.slug.startswith("tk-"))  # fmt: skip
    store = gateway_stack.gateway.gateway.store
    data = [datum([3, 4, 5, 6, 7]), datum([9, 8, 7, 6, 5, 4])]
    tc.forward_backward(data, "cross_entropy").result()  # a first step: B moves off zero
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    start = store.head(slug)

    def cross_entropy(batch, logprobs):
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
                   for d, lp in zip(batch, logprobs, strict=True))  # fmt: skip
        return loss, {"ce": float(loss)}

    forward = tc.forward(data, "cross_entropy").result()
    out = tc.forward_backward_custom(data, cross_entropy).result()
    np.testing.assert_allclose(out.metrics["loss:sum"], forward.metrics["loss:sum"], rtol=1e-5)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    custom = store.head(slug)
    gateway_stack.gateway.models.SetHead(model_pb2.SetHeadRequest(model=slug, checkpoint=start))
    builtin_out = tc.forward_backward(data, "cross_entropy").result()
    np.testing.assert_allclose(builtin_out.metrics["loss:sum"], out.metrics["loss:sum"], rtol=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    builtin = store.head(slug)
    assert custom != builtin
    got = checkpoint_tensors(store.root, store.sampler_path(slug, custom))
    want = checkpoint_tensors(store.root, store.sampler_path(slug, builtin))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    before = checkpoint_tensors(store.root, store.sampler_path(slug, start))
    assert any(not torch.equal(before[k], want[k]) for k in want)  # the step moved them


def test_a_session_and_its_futures_are_answered_by_any_gateway(gateway_stack):
    """Behind a load balancer the SDK's calls reach any gateway: a session made on one is
    known to another, a future submitted to one is retrieved from the other, and a
    resubmitted seq_id (the SDK's retry) gets the same future."""
    import httpx

    from tests.stack import GatewayNode

    stack = gateway_stack
    # The second gateway also runs with no per-team cap (0), which must not mean "none".
    other = GatewayNode(
        stack.config.store, stack.prefix, stack.server.address, max_calls_per_team=0
    )
    try:
        one, two = (g.http_url.removesuffix("/v1") + "/api/v1" for g in (stack.gateway, other))
        key = {"X-API-Key": "tml-local"}

        def post(url: str, route: str, body: dict) -> dict:
            reply = httpx.post(f"{url}/{route}", json=body, headers=key, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.json()

        session = post(one, "create_session", {})["session_id"]
        post(two, "session_heartbeat", {"session_id": session})
        made = post(two, "create_model", {"session_id": session, "model_seq_id": 0,
                    "base_model": "tiny", "lora_config": {"rank": 4}})  # fmt: skip
        run = post(one, "retrieve_future", {"request_id": made["request_id"]})
        assert run["model_id"] == f"{session}:train:0"
        save = {"model_id": run["model_id"], "seq_id": 1, "path": "start"}
        first = post(one, "save_weights_for_sampler", save)["request_id"]
        assert post(two, "save_weights_for_sampler", save)["request_id"] == first  # a retry
        path = post(two, "retrieve_future", {"request_id": first})["path"]
        assert path == f"tinker://{run['model_id']}/sampler_weights/start"
        sampling = {"session_id": session, "sampling_session_seq_id": 0, "model_path": path}
        sid = post(two, "create_sampling_session", sampling)["sampling_session_id"]
        assert httpx.get(f"{one}/samplers/{sid}", headers=key).json()["model_path"] == path
        # A failed operation is its future's answer, on either gateway.
        step = {"model_id": run["model_id"], "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
        failed = post(
            two, "retrieve_future", {"request_id": post(one, "optim_step", step)["request_id"]}
        )
        assert failed["category"] == "user" and "forward_backward first" in failed["error"]
    finally:
        other.stop()


def test_save_state_then_resume_with_optimizer_is_bit_for_bit(gateway_stack, service):
    """save_state → create_training_client_from_state_with_optimizer: the resumed run's
    next step makes exactly the adapter the original run's next step makes (AdamW moments
    and step count continued); without the optimizer it differs (fresh moments)."""
    import torch

    from tests.helpers_training import checkpoint_tensors

    store = gateway_stack.gateway.gateway.store
    adam = types.AdamParams(learning_rate=1e-2)
    first, second = [datum([3, 4, 5, 6, 7])], [datum([9, 8, 7, 6, 5, 4])]
    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    for data in (first, second):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(adam).result()
    path = tc.save_state("two-steps").result().path
    assert path == f"tinker://{tc.model_id}/weights/two-steps"

    def next_step(client) -> dict:
        client.forward_backward(first, "cross_entropy").result()
        client.optim_step(adam).result()
        slug = "tk-" + client.model_id.replace(":train:", "-")
        return checkpoint_tensors(store.root, store.sampler_path(slug, store.head(slug)))

    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    fresh = service.create_training_client_from_state(path).result()
    want = next_step(tc)
    got, other = next_step(resumed), next_step(fresh)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(other[k], want[k]) for k in want)
    # load_state_with_optimizer moves the run back to its own checkpoint: the same step
    # from there makes the same adapter again.
    tc.load_state_with_optimizer(path).result()
    again = next_step(tc)
    for name in want:
        torch.testing.assert_close(again[name], want[name], rtol=0, atol=0, msg=name)


def test_rest_client_lists_runs_and_their_named_checkpoints(gateway_stack, service):
    """RestClient: the team's training runs (Headway forks) with their latest checkpoints,
    a run's named checkpoints (save_state, save_weights_for_sampler), their weights info,
    and deleting one (its name: the step stays in the fork's tree, where Headway users see
    every step)."""
    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    tc.forward_backward([datum([3, 4, 5, 6])], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = tc.save_state("s1").result().path
    sampler = tc.save_weights_for_sampler("w1").result().path
    rest = service.create_rest_client()
    runs = rest.list_training_runs().result()
    run = next(r for r in runs.training_runs if r.training_run_id == tc.model_id)
    assert (run.base_model, run.is_lora, run.lora_rank) == ("tiny", True, 4)
    assert run.last_checkpoint.tinker_path == state
    assert run.last_sampler_checkpoint.tinker_path == sampler
    named = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type) for c in named} == {
        ("weights/s1", "training"), ("sampler_weights/w1", "sampler")}  # fmt: skip
    info = rest.get_weights_info_by_tinker_path(sampler).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == ("tiny", True, 4)
    rest.delete_checkpoint(tc.model_id, "weights/s1").result()
    named = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.checkpoint_id for c in named] == ["sampler_weights/w1"]
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint(tc.model_id, "weights/s1").result()
    slug = "tk-" + tc.model_id.replace(":train:", "-")
    assert len(gateway_stack.gateway.gateway.store.list_checkpoints(slug)) == 2


def test_an_operation_waits_out_a_trainer_that_is_down(tmp_path, tiny_base, monkeypatch, caplog):
    """A future whose trainer is out of reach stays pending (the SDK polls on) and
    completes once a trainer answers on that address again: not a failure the SDK would
    not retry."""
    import logging

    from tests.stack import GatewayNode, TrainerStack, wait_until

    caplog.set_level(logging.INFO, logger="gateway.tinker_api")
    store = tmp_path / "store"
    first = TrainerStack(store)
    first.add_base(tiny_base, "tiny")
    address, prefix = first.server.address, first.prefix
    gateway = GatewayNode(store, prefix, address)
    first.stop()
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(
        base_url=gateway.http_url.removesuffix("/v1"), api_key="tml-local"
    )
    later = None
    try:
        future = service.create_lora_training_client(base_model="tiny", rank=4)
        # The gateway has taken the call and found no trainer: it waits, the SDK polls.
        wait_until(
            lambda: any("tinker op waits" in r.getMessage() for r in caplog.records),
            "the gateway to find the trainer down",
        )
        later = TrainerStack(store, address, prefix)
        tc = future.result()
        assert tc.get_info().model_data.model_name == "tiny"
    finally:
        service.close("success").result()
        gateway.stop()
        if later is not None:
            later.stop()


def test_sl_loop_shape_lowers_the_loss(gateway_stack, service):
    """The shape of tinker-cookbook's `recipes/sl_loop.py`: chat-formatted examples
    (rendered by the base's own chat template through the SDK's get_tokenizer(), the
    prompt weighted 0 and the answer 1), cross_entropy, optim_step; the loss per answer
    token falls over the epochs."""
    tc = service.create_lora_training_client(base_model="tiny", rank=8).result()
    tok = tc.get_tokenizer()
    pairs = [("what is 2 plus 3?", "5"), ("what is 10 plus 4?", "14"),
             ("what is 7 plus 7?", "14"), ("what is 1 plus 8?", "9")]  # fmt: skip
    data, answer_tokens = [], 0
    for question, answer in pairs:
        user = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(
            user + [{"role": "assistant", "content": answer}], tokenize=True
        )
        prompt, full = (
            list(getattr(prompt, "input_ids", prompt)),
            list(getattr(full, "input_ids", full)),
        )
        assert full[: len(prompt)] == prompt
        weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
        answer_tokens += len(full) - len(prompt)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={"target_tokens": full[1:], "weights": weights},
        ))  # fmt: skip
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        losses.append(fb.result().metrics["loss:sum"] / answer_tokens)
        opt.result()
    assert losses[-1] < losses[0] / 2, losses


def test_base_model_sampling_and_compute_logprobs(gateway_stack, service):
    """create_sampling_client(base_model=) samples the base's head; compute_logprobs and
    prompt logprobs are Headway's ComputeLogprobs of the same tokens (NaN first, as the
    SDK's None)."""
    sampler = service.create_sampling_client(base_model="tiny").result()
    tokens = [5, 9, 12, 7, 3, 14]
    got = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    ours = gateway_stack.gateway.sampling.ComputeLogprobs(sampling_pb2.ComputeLogprobsRequest(
        model="tiny", sequences=[to_tensor(np.array(tokens, np.int32))]))  # fmt: skip
    want = from_tensor(ours.logprobs[0], "logprobs")
    assert got[0] is None and len(got) == len(tokens)
    np.testing.assert_allclose(np.array(got[1:], np.float32), want, rtol=0, atol=1e-6)
    out = sampler.sample(types.ModelInput.from_ints(tokens), 1, types.SamplingParams(
        max_tokens=3, temperature=0.0), include_prompt_logprobs=True).result()  # fmt: skip
    assert len(out.sequences[0].tokens) <= 3
    np.testing.assert_allclose(np.array(out.prompt_logprobs[1:], np.float32), want, atol=1e-4)
    # Top-k of the prompt's and the sampled positions: Headway's top_logprobs, each its k.
    out = sampler.sample(types.ModelInput.from_ints(tokens), 1, types.SamplingParams(
        max_tokens=3, temperature=0.0, stop=[]), topk_prompt_logprobs=2,
        topk_sample_logprobs=3).result()  # fmt: skip
    ours = gateway_stack.gateway.sampling.Sample(sampling_pb2.SampleRequest(
        model="tiny", prompt_tokens=to_tensor(np.array(tokens, np.int32)),
        params=common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                         top_logprobs=3),
        include_prompt_logprobs=True))  # fmt: skip
    prompt_ids = from_tensor(ours.prompt_top_token_ids, "ids")[:, :2].tolist()
    prompt_lps = from_tensor(ours.prompt_top_logprobs, "lps")[:, :2]
    topk = out.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == len(tokens)
    assert [[t for t, _ in row] for row in topk[1:]] == prompt_ids
    np.testing.assert_allclose([[v for _, v in row] for row in topk[1:]], prompt_lps, atol=1e-6)
    seq, want_seq = out.sequences[0], ours.sequences[0]
    assert seq.tokens == from_tensor(want_seq.tokens, "tokens").tolist()
    assert [[t for t, _ in row] for row in seq.topk_logprobs] == from_tensor(
        want_seq.top_token_ids, "ids").tolist()  # fmt: skip
    assert out.prompt_logprobs is None  # not asked: only the top-k


def test_bad_wire_input_is_a_400_naming_the_field(gateway_stack, service):
    """What the SDK would never send but a hand-written client might: a 400 that names the
    field, nothing started (the run's next operation still runs)."""
    import httpx

    from headway.v1 import tinker_pb2

    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    url = gateway_stack.gateway.http_url.removesuffix("/v1") + "/api/v1"
    key = {"X-API-Key": "tml-local"}

    def fb_body(shape: list[int]) -> bytes:
        wire = tinker_pb2.TinkerForwardBackwardRequest(
            model_id=tc.model_id, seq_id=50, loss_fn="cross_entropy"
        )
        d = wire.data.add()
        d.model_input.add().encoded_text.tokens = np.array([3, 4], np.int32).tobytes()
        target = d.loss_fn_inputs["target_tokens"]
        target.dtype = tinker_pb2.TINKER_DTYPE_INT64
        target.sparse_csr.values = np.array([4, 5], np.int64).tobytes()
        target.sparse_csr.crow_indices = np.array([0, 2], np.int64).tobytes()
        target.sparse_csr.col_indices = np.array([0, 1], np.int64).tobytes()
        target.shape.extend(shape)
        return wire.SerializeToString()  # fmt: skip

    huge = httpx.post(f"{url}/forward_backward", content=fb_body([1, 2**31]),
                      headers={**key, "Content-Type": "application/x-protobuf"})  # fmt: skip
    assert huge.status_code == 400 and "2-D shape of 2 elements" in huge.text
    cases = [
        ("get_info", {"model_id": "tiny"}, "is a base, not a training run"),
        ("create_model", {"session_id": "nope", "model_seq_id": 0, "base_model": "tiny"},
         "no session"),
    ]  # fmt: skip
    for route, body, message in cases:
        reply = httpx.post(f"{url}/{route}", json=body, headers=key)
        assert reply.status_code in (400, 404) and message in reply.text, (route, reply.text)
    sampler = tc.save_weights_and_get_sampling_client().result()
    sid, prompt = sampler._sampling_session_id, {"chunks": [{"tokens": [3, 4]}]}
    for bad, field in (({"num_samples": 10**9}, "num_samples"),
                       ({"sampling_params": {"top_p": "x"}}, "top_p"),
                       ({"sampling_params": {"temperature": 10**400}}, "temperature"),
                       ({"prompt": {"chunks": [{"tokens": [-1]}]}}, "tokens")):  # fmt: skip
        body = {"sampling_session_id": sid, "num_samples": 1, "prompt": prompt, **bad}
        reply = httpx.post(f"{url}/asample", json=body, headers=key)
        assert reply.status_code == 400 and field in reply.text, reply.text
    for adam in ({"learning_rate": True}, {"learning_rate": 10**400}):
        step = {"model_id": tc.model_id, "seq_id": 60, "adam_params": adam}
        reply = httpx.post(f"{url}/optim_step", json=step, headers=key)
        assert reply.status_code == 400 and "learning_rate" in reply.text, reply.text
    json_type = {**key, "Content-Type": "application/json"}
    nested = httpx.post(f"{url}/get_info", content=b"[" * 100_000, headers=json_type)
    assert nested.status_code == 400, nested.text
    assert "loss:sum" in tc.forward_backward([datum([3, 4, 5])], "cross_entropy").result().metrics


def test_external_weights_download_as_a_peft_adapter(gateway_stack, service, tmp_path):
    """save_weights_external + RestClient's signed URLs give the run's PEFT adapter as the
    store holds it (fetched with no key, as the SDK does); the SDK's own CLI downloads a
    save_state checkpoint the same way (a run made from it, exported, the export deleted);
    bad input is the SDK's user error and changes nothing."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    tc = service.create_lora_training_client(base_model="tiny", rank=4).result()
    tc.forward_backward([datum([3, 4, 5, 6])], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_external("e1").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/e1"
    rest = service.create_rest_client()
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {"adapter_config.json", "adapter_model.safetensors"}
    store = gateway_stack.gateway.gateway.store
    slug = "tk-" + tc.model_id.replace(":train:", "-")
    folder = store.files_dir(store.resolve(slug, store.head(slug)))
    for name, url in urls.items():
        with urllib.request.urlopen(url) as reply:  # no key: the URL is the credential
            assert reply.read() == (folder / name).read_bytes()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    named = {
        c.checkpoint_id: c.checkpoint_type
        for c in rest.list_checkpoints(tc.model_id).result().checkpoints
    }
    assert named == {"external_weights/e1": "external"}

    with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
        tc.save_weights_external("e2", age_encryption_recipients=["age1xyz"]).result()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        tc.save_weights_external("e3", ttl_seconds=5).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(f"tinker://{tc.model_id}/external_weights/nope").result()
    url = urls["adapter_model.safetensors"]
    for bad in (
        url.replace("/downloads/", "/downloads/x"),  # not a token
        url.replace("adapter_model", "optimizer"),
    ):  # not a file of the export
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad)
        assert e.value.code == 404
    assert rest.get_external_weights_urls(path).result().urls == urls  # one token per export
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    assert set(named) == {
        c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints
    }

    # Deleting the name revokes its URLs.
    tc.save_weights_external("e4").result()
    doomed = rest.get_external_weights_urls(f"tinker://{tc.model_id}/external_weights/e4")
    doomed_url = doomed.result().urls["adapter_config.json"]
    urllib.request.urlopen(doomed_url).read()
    rest.delete_checkpoint(tc.model_id, "external_weights/e4").result()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(doomed_url)
    assert e.value.code == 404

    # The SDK's CLI: a training checkpoint (save_state) downloaded as external weights.
    state = tc.save_state("s1").result().path
    env = dict(os.environ, TINKER_BASE_URL=gateway_stack.gateway.http_url.removesuffix("/v1"),
               TINKER_API_KEY="tml-local", TINKER_TELEMETRY="0")  # fmt: skip
    cli = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "checkpoint", "download", state,
         "--output", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    got = tmp_path / state.removeprefix("tinker://").replace("/", "_")
    assert (got / "adapter_model.safetensors").read_bytes() == (
        folder / "adapter_model.safetensors"
    ).read_bytes()
