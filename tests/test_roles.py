"""Roles: registering a base (a directory of the servers) is an admin action, limited to
the trainer's base roots, and only admins see a base's server path. Over real gRPC,
through a gateway with auth on (tests/helpers_auth.py)."""

from __future__ import annotations

import os
import shutil

from headway.v1 import model_pb2
from tests.helpers_auth import code_of
from tests.stack import team_md


def test_a_team_key_cannot_register_any_path_and_learns_nothing_of_it(secured_stack, tmp_path):
    stack = secured_stack
    outside = tmp_path / "elsewhere"
    shutil.copytree(stack.base, outside)
    paths = [
        stack.base,  # a valid base, inside the roots
        stack.roots / "missing",  # does not exist
        outside,  # a valid base outside the roots
        "/etc",  # exists, outside
        "/no/such/dir",
        "relative/dir",
        "",
    ]
    for path in paths:
        code, details = code_of(lambda p=path: stack.add_base(p, "taken", "red"))
        assert code == "PERMISSION_DENIED", (path, details)
        assert "admin" in details
        # Nothing about the path: the answer is the same whatever exists on the server.
        assert "/" not in details, details
    assert stack.slugs() == ["tiny"]  # nothing registered, the name is still free
    assert sorted(p.name for p in (stack.store / "models").iterdir()) == ["tiny"]


def test_an_admin_key_registers_bases_only_under_the_base_roots(secured_stack, tmp_path):
    stack = secured_stack
    outside = tmp_path / "elsewhere"
    shutil.copytree(stack.base, outside)
    code, details = code_of(lambda: stack.add_base(outside, "outside", "admin"))
    assert code == "PERMISSION_DENIED" and str(stack.roots) in details
    # A symlink under a root resolves outside it: refused too.
    os.symlink(outside, stack.roots / "link")
    code, details = code_of(lambda: stack.add_base(stack.roots / "link", "linked", "admin"))
    assert code == "PERMISSION_DENIED" and "outside" in details
    # ".." cannot climb out either.
    escape = stack.roots / ".." / "elsewhere"
    assert code_of(lambda: stack.add_base(escape, "dotdot", "admin"))[0] == "PERMISSION_DENIED"
    inside = stack.roots / "second"
    shutil.copytree(stack.base, inside)
    assert stack.add_base(inside, "second", "admin").path == str(inside)
    assert stack.slugs() == ["second", "tiny"]


def test_without_base_roots_only_local_mode_registers_bases(trainer_stack, tmp_path):
    """`trainer_stack` has no roots and no token (loopback): its fixture registered "tiny"
    as the local caller (no metadata); an admin of a deployment with keys may not."""
    stack = trainer_stack
    other = tmp_path / "other"
    shutil.copytree(stack.trainer.store.get_model("tiny").path, other)
    admin = [("x-headway-team", "ops"), ("x-headway-admin", "1")]
    request = model_pb2.AddBaseRequest(path=str(other), name="other")
    code, details = code_of(lambda: stack.models.AddBase(request, metadata=admin))
    assert code == "FAILED_PRECONDITION" and "--base-root" in details
    assert stack.models.AddBase(request).slug == "other"  # the local caller


def test_a_base_path_is_shown_only_to_admins(secured_stack):
    stack = secured_stack
    models = stack.gateway.models
    get = model_pb2.GetModelRequest(model="tiny")
    assert models.GetModel(get, metadata=stack.md("admin")).path == str(stack.base)
    assert models.GetModel(get, metadata=stack.md("red")).path == ""
    listed = models.ListModels(model_pb2.ListModelsRequest(), metadata=stack.md("red")).models
    assert [(m.slug, m.path) for m in listed] == [("tiny", "")]


def test_old_callers_without_a_role_are_not_admins(trainer_stack, tiny_base):
    """Team metadata without x-headway-admin (an older gateway) carries no admin right."""
    stack = trainer_stack
    request = model_pb2.GetModelRequest(model="tiny")
    assert stack.models.GetModel(request, metadata=team_md("red")).path == ""
    code, _ = code_of(
        lambda: stack.models.AddBase(
            model_pb2.AddBaseRequest(path=str(tiny_base), name="again"), metadata=team_md("red")
        )
    )
    assert code == "PERMISSION_DENIED"
