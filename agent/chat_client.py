"""A tiny OpenAI-API chat client for the terminal (`flock chat`, the demo)."""

from __future__ import annotations

import json
import sys

import httpx


def stream_chat(url: str, model: str, prompt: str, *, max_tokens: int = 256,
                out: object = None) -> int:
    """Stream one greedy chat answer to stdout; returns a process exit code."""
    stream = out or sys.stdout
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    try:
        with httpx.stream("POST", f"{url.rstrip('/')}/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(10.0, read=300.0)) as response:
            if response.status_code != 200:
                response.read()
                print(f"error {response.status_code}: {response.text}", file=sys.stderr)
                return 1
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    print(f"\nerror: {chunk['error'].get('message')}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        stream.write(text)  # type: ignore[attr-defined]
                        stream.flush()  # type: ignore[attr-defined]
    except httpx.HTTPError as exc:
        print(f"could not reach {url}: {exc}", file=sys.stderr)
        return 1
    stream.write("\n")  # type: ignore[attr-defined]
    return 0
