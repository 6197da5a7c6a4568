"""Impatient clients: a seeded storm of the traffic that wedged the frontend (issue 10).

    python -m harness.impatient --target HOST:PORT [--metrics-url URL] --seed N [mix flags]

Everything the generator sends is drawn from `--seed` (texts, deadlines,
cancel delays, which kind comes when), so a failing run can be replayed
against a fresh stack. The kinds:

- single     one fresh text, a deadline drawn from --deadline-ms (default 1-12 ms);
- cancelled  one fresh text, long deadline, cancelled after a delay drawn from --cancel-after-ms;
- stream_cancelled  an EmbedStream that sends a few requests, then is cancelled mid-stream;
- stream_abandoned  an EmbedStream that sends a few requests and is then forgotten: never
             half-closed, never read, the call object kept referenced on its own channel.
             After the traffic that channel stays open for --hold-abandoned-s, so the
             server's idle timeout (--stream-idle-seconds), not a client disconnect, is what
             has to end those streams;
- group      leader/follower: several callers ask for one fresh text at once, with
             different deadlines, some cancelled early, some late;
- oversized  an input over the frontend's max_chars, or a message over 4 MiB; expects
             INVALID_ARGUMENT or RESOURCE_EXHAUSTED.

After the traffic: a brand-new text (a uuid, never part of the seeded texts, so
it is computed even on a warm server) with a 1 s deadline must succeed, retried
for at most --probe-budget-s; Health "" must be SERVING; with --metrics-url the
frontend's in-flight gauges must come back to their idle values within
--idle-timeout-s; with --hold-abandoned-s > 0 the server must have ended every
abandoned stream by the end of the hold; no call may end INTERNAL or UNKNOWN,
and oversized calls must end INVALID_ARGUMENT or RESOURCE_EXHAUSTED. One JSON
summary goes to stdout (progress to stderr); the exit code is 0 only if every
post-condition holds.

Defaults are the issue's "Done when" profile: 1500 single-text calls with
1-12 ms deadlines, 200 cancelled calls, 40 abandoned streams, their start
times spread over 15 s. A steady arrival matters: the same calls sent as one
burst mostly expire before the server reaches them. The chaos soak
(tests/chaos) runs this same command against its stack.
"""
