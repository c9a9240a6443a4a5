"""Why the webhook receiver refuses a request: the one list of reasons.

A reason is the ``error`` of the JSON answer, the ``reason`` of the ``webhook.refused`` log line
and the ``reason`` label of ``pandasync_webhook_rejected_total``, so the set is small and fixed.
Each comes with what it means and what the operator does about it; the table in
docs/operations.md is generated from here (``python -m service.webhooks.reasons``) and a test
fails when the two differ.

A request head over ``MAX_HEADER_BYTES`` or slower than ``HEADER_TIMEOUT_S`` is refused by the
server before the receiver sees it (``limits.py``) and has no reason here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    name: str
    answer: str  # the HTTP status the sender gets
    meaning: str
    fix: str


REASONS: tuple[Reason, ...] = (
    Reason(
        "payload_too_large",
        "413",
        "the body (declared or as it streams in) is over `MAX_BODY_BYTES`",
        "a PandaPon message is a few KB: if the `webhook.refused` log shows PandaPon sent it, "
        "raise `PANDASYNC_MAX_BODY_BYTES`; otherwise someone is probing",
    ),
    Reason(
        "unsupported_media_type",
        "415",
        "the content type is not `application/json`, or names a charset other than UTF-8",
        "check that no proxy rewrites `content-type`; if PandaPon sends another type, report "
        "it (`pandasync doctor --listen` shows what came)",
    ),
    Reason(
        "malformed_json",
        "400",
        "the body is not UTF-8 JSON",
        "check that no proxy alters bodies; `pandasync doctor --listen` shows the body's shape",
    ),
    Reason(
        "malformed_envelope",
        "400",
        "JSON, but not an envelope the receiver can read (`messageType`, `messagePlatform`, "
        "an id, `timestamp` or the `user-id` header; the log line's `detail` says which)",
        "if PandaPon sent it, report the `detail`: the envelope reader must learn the shape",
    ),
    Reason(
        "missing_header",
        "401",
        "a valid signature is required and a signature header (`access-key`, `timestamp`, "
        "`nonce-str`, `signature`) is missing",
        "PandaPon sends unsigned callbacks: set `PANDASYNC_WEBHOOK_TOKEN` and register the "
        "token URL under `PANDASYNC_WEBHOOK_AUTH=auto`",
    ),
    Reason(
        "wrong_access_key",
        "401",
        "the `access-key` header is not `PANDASYNC_ACCESS_KEY` (with an accounts file: not "
        "the `access_key` of any account)",
        "set `PANDASYNC_ACCESS_KEY` (or the account's `access_key`) to the console's AccessKey",
    ),
    Reason(
        "account_mismatch",
        "401",
        "with several accounts: the `access-key` or `user-id` header names another account "
        "than the path token, or the two headers name different accounts",
        "not PandaPon (it sends its own account's headers): someone probing, or two accounts' "
        "tokens crossed in the console; compare the console's URL with `pandasync doctor`",
    ),
    Reason(
        "bad_timestamp",
        "401",
        "the `timestamp` header is not an integer",
        "the sender does not send epoch digits: if it is PandaPon, use the token URL "
        "(`PANDASYNC_WEBHOOK_AUTH=auto`) and report it",
    ),
    Reason(
        "stale_timestamp",
        "401",
        "signed as we sign, but older than `SIGNATURE_TOLERANCE_S`",
        "fix this host's clock (NTP); if `pandasync doctor --listen` says the timestamp is in "
        "s, set `PANDASYNC_TIMESTAMP_UNIT=s`",
    ),
    Reason(
        "future_timestamp",
        "401",
        "signed as we sign, but ahead by more than `SIGNATURE_TOLERANCE_S`",
        "fix this host's clock (NTP); if the timestamp is in ms while the setting says s, set "
        "`PANDASYNC_TIMESTAMP_UNIT=ms`",
    ),
    Reason(
        "bad_nonce",
        "401",
        "the `nonce-str` header is longer than 64 characters",
        "not PandaPon (its nonces have 32): someone probing, nothing to fix",
    ),
    Reason(
        "bad_signature",
        "401",
        "the `signature` does not match the one computed with `PANDASYNC_ACCESS_SECRET` (with "
        "an accounts file: the secret of the account the headers name)",
        "after a secret reset, update `PANDASYNC_ACCESS_SECRET`; if PandaPon signs otherwise, "
        "register the token URL under `PANDASYNC_WEBHOOK_AUTH=auto`",
    ),
    Reason(
        "replayed_nonce",
        "401",
        "where the signature authenticates, a nonce already used within the window",
        "a resent copy of a signed request: nothing to fix; if PandaPon reuses nonces on its "
        "retries, use the token URL, where a repeat is only a duplicate",
    ),
    Reason(
        "missing_token",
        "401",
        "`/webhooks/pandapon` without the token, in mode `token` or `signature+token`",
        "enter the token URL that `pandasync doctor` prints as the callback URL",
    ),
    Reason(
        "wrong_token",
        "401",
        "the path token is not `PANDASYNC_WEBHOOK_TOKEN` (with an accounts file: no account's "
        "`webhook_token` or `previous_webhook_tokens`), in every mode",
        "the console's URL and the setting differ: enter the URL that `pandasync doctor` prints",
    ),
    Reason(
        "store_timeout",
        "503",
        "the message was not stored within `INBOX_WRITE_TIMEOUT_MS`; PandaPon retries it",
        "Postgres is slow or its connections are exhausted: check its load and "
        "`DB_POOL_SIZE`; `pandasync_webhook_store_seconds` shows the trend",
    ),
    Reason(
        "store_failed",
        "503",
        "the message could not be stored (database error, or the receiver stopping); PandaPon "
        "retries it",
        "check that Postgres is reachable (`/readyz`) and the `inbox.write_failed` log line",
    ),
    Reason(
        "client_disconnected",
        "none (the sender left)",
        "the sender closed the connection before its body or our answer",
        "answers are too slow or a proxy cuts them: compare `pandasync_webhook_store_seconds` "
        "with the proxy's timeouts",
    ),
    Reason(
        "body_timeout",
        "408",
        "the body did not all arrive within `BODY_TIMEOUT_S`; the connection is closed",
        "a stalled or slow sender; if it is PandaPon, raise `PANDASYNC_BODY_TIMEOUT_S`",
    ),
    Reason(
        "internal_error",
        "503",
        "an unexpected error in the receiver (also the label of any reason not listed here); "
        "PandaPon retries",
        "a bug: report the `webhook.internal_error` log line, which has the traceback",
    ),
)

REASON_NAMES: tuple[str, ...] = tuple(reason.name for reason in REASONS)
BY_NAME: dict[str, Reason] = {reason.name: reason for reason in REASONS}


def reasons_table() -> str:
    """The Markdown table of docs/operations.md, between its ``rejections`` markers."""
    lines = ["| reason | answer | what it means | what to do |", "|---|---|---|---|"]
    lines += [f"| `{r.name}` | {r.answer} | {r.meaning} | {r.fix} |" for r in REASONS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reasons_table(), end="")
