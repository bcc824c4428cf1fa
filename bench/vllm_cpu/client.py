"""Talks to serve_llm.py with the official openai client: chat, a timed stream (TTFT, tok/s), and
whether min_tokens, frequency_penalty and a '### End' stop string take effect. Usage: client.py MODEL_ID"""

import argparse
import time

import openai


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--port", type=int, default=18000)
    a = p.parse_args()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="x", timeout=300, max_retries=0)
    print("models:", [m.id for m in client.models.list().data])
    msg = [{"role": "user", "content": "What is the capital of France?"}]

    r = client.chat.completions.create(model=a.model, messages=msg, max_tokens=32, temperature=0)
    print("CHAT:", repr(r.choices[0].message.content), r.choices[0].finish_reason, r.usage)

    t0, first, n = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model=a.model,
        messages=msg,
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    print(
        f"STREAM: TTFT {first - t0:.2f}s, {n} tokens, {n / (end - t0):.1f} tok/s overall, {(n - 1) / (end - first):.1f} tok/s after first"
    )

    # min_tokens: with a 1-token stop on eos the answer would end early; min_tokens=40 forbids eos before 40
    r = client.chat.completions.create(model=a.model, messages=msg, max_tokens=60, temperature=0, extra_body={"min_tokens": 40})
    print("MIN_TOKENS=40:", r.usage.completion_tokens, "tokens, finish", r.choices[0].finish_reason)
    r = client.chat.completions.create(model=a.model, messages=msg, max_tokens=60, temperature=0)
    print("  without min_tokens:", r.usage.completion_tokens, "tokens, finish", r.choices[0].finish_reason)

    rep = [{"role": "user", "content": "Repeat the word 'apple' fifty times."}]
    plain = client.chat.completions.create(model=a.model, messages=rep, max_tokens=40, temperature=0)
    pen = client.chat.completions.create(model=a.model, messages=rep, max_tokens=40, temperature=0, frequency_penalty=2.0)
    print("FREQ_PENALTY 0:", repr(plain.choices[0].message.content[:120]))
    print(
        "FREQ_PENALTY 2:",
        repr(pen.choices[0].message.content[:120]),
        "differs:",
        plain.choices[0].message.content != pen.choices[0].message.content,
    )

    # stop string through the completions API on a prompt whose continuation contains '### End'
    prompt = "### Instruction:\nSay hi.\n### Response:\nhi\n### End\n### Instruction:\nSay yes.\n### Response:\nyes\n### End\n### Instruction:\nSay no.\n### Response:\n"
    free = client.completions.create(model=a.model, prompt=prompt, max_tokens=30, temperature=0)
    stop = client.completions.create(model=a.model, prompt=prompt, max_tokens=30, temperature=0, stop=["### End"])
    print("NO STOP:", repr(free.choices[0].text), free.choices[0].finish_reason)
    print(
        "STOP '### End':",
        repr(stop.choices[0].text),
        stop.choices[0].finish_reason,
        "stop_reason:",
        getattr(stop.choices[0], "stop_reason", None),
    )


if __name__ == "__main__":
    main()
