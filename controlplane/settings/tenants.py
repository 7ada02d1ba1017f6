"""Auth settings: tenants, their keys and limits, the admin key and the agents' token or
their Kubernetes identity (``agent_review``)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence

import pydantic
from pydantic import Field

from controlplane.settings import fairness
from synapse_common import logs
from synapse_common.settings import Secret, Section

MIN_RESPONSE_ID_KEY = 16    # characters: a short MAC key can be guessed offline from one id
MIN_KEY = 16    # characters of an API key or token below which start-up warns (guessable)
# A ServiceAccount's username as the API server reports it: a namespace (a DNS label) and
# the account's name (a DNS subdomain), as k8s.io/apiserver's serviceaccount.SplitUsername.
SERVICE_ACCOUNT = re.compile(r"system:serviceaccount:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?:"
                             r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")


class TenantSettings(Section):
    name: str = Field(..., min_length=1, description="tenant id (cache scope, rate limits)")
    key_sha256: list[str] = Field(default_factory=list,
                                  description="sha256 hex digests of this tenant's API keys")
    keys: list[Secret] = Field(default_factory=list,
                               description="API keys as secrets ({env: X} / {file: P} / literal)")
    allowed_models: list[str] = Field(default_factory=list,
                                      description="canonical models or aliases; empty = all")
    requests_per_second: float | None = Field(None, gt=0, description="rate limit; none = unlimited")
    burst: int | None = Field(None, ge=1, description="bucket size (default: 2 x rate)")
    max_concurrent: int | None = Field(None, ge=1, description="concurrent requests limit")
    # fairness (issue 18)
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + completion tokens per minute over all models "
        "(completion counted from max_tokens at admission, settled from usage)")
    budget: fairness.BudgetSettings | None = Field(None, description="tokens or cost per day / month "
                                          "over all models")
    models: dict[str, fairness.TokenLimitSettings] = Field(
        default_factory=dict, description="limits for one model (name or alias), on top of "
        "the tenant's own")
    priority: str = Field("interactive", min_length=1,
                          description="priority class (one of fairness.queue.classes)")
    weight: float = Field(1.0, gt=0, le=1000, description="share of its class when queued "
                          "(weighted fair queuing by tokens), and its share of a serving "
                          "process's CPU against the other tenants' weights (core.loop_share)")
    priority_header: bool = Field(
        False, description="let requests choose their class with the fairness.queue.header "
        "header (any configured class)")

    @pydantic.model_validator(mode="after")
    def _no_empty_key(self) -> TenantSettings:
        # On the section, not the field: a field's error line would quote the value.
        for i, key in enumerate(self.keys):
            if not key.get_secret_value():
                raise ValueError(_empty(f"keys.{i}", "the tenant could never use it"))
        return self


class AgentReviewSettings(Section):
    """Agents prove which node they run on with their pod's projected ServiceAccount token,
    which the control plane has the Kubernetes API review (TokenReview)."""

    service_accounts: list[str] = Field(
        ..., min_length=1, description="usernames of the agents' ServiceAccounts, "
        "'system:serviceaccount:<namespace>:<name>': a token of any other account is refused")
    audience: str = Field("synapse-agent", min_length=1, description="audience the agents' "
                          "projected tokens are issued for (a token for another audience, "
                          "the API server's own included, is refused)")
    api_server: str = Field("https://kubernetes.default.svc", description="the Kubernetes "
                            "API server's URL; plain http only to a loopback address")
    token_file: str = Field("/var/run/secrets/kubernetes.io/serviceaccount/token",
                            min_length=1, description="the control plane's own ServiceAccount "
                            "token, presented to the API server (re-read when it changes: it "
                            "rotates); its account needs to create tokenreviews (authentication.k8s.io), as "
                            "the chart's ClusterRole grants")
    ca_file: str = Field("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", min_length=1,
                         description="CA bundle that verifies the API server's certificate")
    timeout_s: float = Field(5.0, gt=0, description="time limit of one review")
    max_concurrent: int = Field(4, ge=1, description="reviews in flight at once; beyond it a "
                                "Connect is refused as unavailable at once, so that callers "
                                "presenting tokens cannot flood the API server")

    @pydantic.field_validator("service_accounts")
    @classmethod
    def _usernames(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if not SERVICE_ACCOUNT.fullmatch(name):
                raise ValueError(f"service_accounts.{i}: {name!r} is not a ServiceAccount's "
                                 "username 'system:serviceaccount:<namespace>:<name>'")
        return value

    @pydantic.field_validator("api_server")
    @classmethod
    def _api_server(cls, value: str) -> str:
        url = urllib.parse.urlsplit(value)
        shown = logs.mask_url_credentials(value)   # its password stays out of the error
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError(f"api_server: {shown!r} is not an http(s) URL")
        if url.scheme == "http" and not _loopback(url.hostname):
            raise ValueError(f"api_server: {shown!r} is plain http to another machine: the "
                             "agents' tokens would cross the network readable; use https")
        return value


class AuthSettings(Section):
    enabled: bool = Field(True, description="require a tenant's Bearer key on /v1 "
                          "(false: /v1 is open, as tenant 'anonymous'); admin routes need "
                          "admin_key either way")
    admin_key: Secret | None = Field(None, description="key for admin HTTP routes and Admin gRPC")
    response_id_key: Secret | None = Field(
        None, description="secret that binds each /v1/responses id to the tenant that made "
        "it (a MAC inside the id): every worker and replica must share it, and changing it "
        "refuses every earlier id (404); at least 16 characters. None = derived from "
        "admin_key when it has at least 16 characters; else a random key per process, so "
        "a conversation continues only on the process that began it")
    tenants: list[TenantSettings] = Field(default_factory=list, description="API tenants")
    key_file: str | None = Field(
        None, description="YAML/JSON file with a list of tenants (same fields), merged in")
    admin_tenant: str | None = Field(
        None, description="the tenant (by name) the admin key acts as on /v1, with its "
        "allow-list and limits; none = the admin key is refused on /v1")
    agent_token: Secret | None = Field(
        None, description="token shared with the agents (their control_plane.token): its "
        "holder may register on ControlPlane.Connect as any node. Also keys the engines' "
        "prefix-cache salts and the copies of agent streams to the serving workers, so "
        "agent_review needs it too (its agents need not hold it)")
    allow_unauthenticated_agents: bool = Field(
        False, description="without agent_token, let any client reaching the gRPC port "
        "register as an agent (and receive tenants' prompts). Without agent_token, a "
        "grpc.host other than loopback does not start unless this is true")
    agent_review: AgentReviewSettings | None = Field(
        None, description="agents present their pod's projected ServiceAccount token on "
        "ControlPlane.Connect and may register only as the node the Kubernetes API says it "
        "is bound to (needs Kubernetes 1.30+); none = the shared agent_token alone")

    @pydantic.model_validator(mode="after")
    def _no_empty_secret(self) -> AuthSettings:
        for name, secret, meaning in (
                ("admin_key", self.admin_key, "it would act as if no admin key were set "
                 "(every admin route and Admin call refused)"),
                ("agent_token", self.agent_token, "it would act as if no agent token were "
                 "set (no agent could register, engines would get no key)")):
            if secret is not None and not secret.get_secret_value():
                raise ValueError(_empty(name, meaning))
        return self

    @pydantic.model_validator(mode="after")
    def _review_keeps_a_token(self) -> AuthSettings:
        if self.agent_review is not None and self.agent_token is None:
            raise ValueError("agent_review: needs agent_token too (it keys the engines' "
                             "prefix-cache salts and the copies of agent streams to the "
                             "serving workers; the agents need not hold it)")
        return self

    @pydantic.model_validator(mode="after")
    def _response_id_key_long_enough(self) -> AuthSettings:
        # On the section, not the field: a field's error line would quote the value.
        key = self.response_id_key
        if key is not None and len(key.get_secret_value()) < MIN_RESPONSE_ID_KEY:
            raise ValueError(f"response_id_key: must be at least {MIN_RESPONSE_ID_KEY} "
                             "characters (it signs every /v1/responses id: a short key can "
                             "be guessed and any tenant's conversation continued)")
        return self

    @property
    def agent_token_value(self) -> str | None:
        return self.agent_token.get_secret_value() if self.agent_token else None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _empty(field: str, meaning: str) -> str:
    """The error for a secret that resolved to nothing: most often a secret file or
    variable that exists but is empty (a Secret key with no value), which would otherwise
    start a control plane that silently behaves as if the secret were absent."""
    return f"{field}: is empty (an empty secret file or environment variable?): {meaning}"


def short_secrets(auth: AuthSettings, tenants: Sequence[TenantSettings]) -> list[str]:
    """Where a tenant key (of ``tenants``: the configured ones, ``key_file``'s included),
    ``admin_key`` or ``agent_token`` shorter than :data:`MIN_KEY` is set, never its value.

    Each guess at a key is one request, answered at once: a key of a few characters can be
    found by trying them all, and then opens that tenant's account (or the Admin API, or
    the agents' door). Not refused, since keys are chosen outside Synapse; said at start."""
    found = [f"auth.tenants[{t.name}].keys[{i}]" for t in tenants
             for i, key in enumerate(t.keys) if len(key.get_secret_value()) < MIN_KEY]
    found += [f"auth.{name}" for name, secret in (("admin_key", auth.admin_key),
                                                  ("agent_token", auth.agent_token))
              if secret is not None and len(secret.get_secret_value()) < MIN_KEY]
    return found
