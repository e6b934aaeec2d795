"""A small OpenAI-compatible chat server on loopback, for testing clients end to end over real HTTP.

It answers ``POST /v1/chat/completions`` with OpenAI-shaped JSON. ``fail`` is a list of HTTP statuses
to answer the first requests with (429, 500, ...), to exercise retries. Batch prompts (asking for a JSON
array) get ``tasks_per_reply`` distinct Chinese tasks, with one near-duplicate and one refusal planted in
every reply; two-step prompts get one instruction, and a plain prompt gets an answer. Token usage is
counted as characters / 2 and summed in ``usage_totals``, so a client's accounting can be checked exactly.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOPICS = [
    "长城",
    "熊猫",
    "茶叶",
    "春节",
    "高铁",
    "丝绸之路",
    "京剧",
    "水墨画",
    "围棋",
    "算盘",
    "豆腐",
    "饺子",
    "黄河",
    "泰山",
    "敦煌",
    "二十四节气",
    "中医",
    "汉字",
    "瓷器",
    "剪纸",
    "太极拳",
    "火锅",
    "桂林山水",
    "西湖",
    "兵马俑",
    "故宫",
    "苏州园林",
    "昆曲",
    "风筝",
    "月饼",
    "端午节",
    "元宵节",
    "四大发明",
    "唐诗",
    "宋词",
    "楷书",
]


class StubState:
    def __init__(self, fail: list[int] | None = None, tasks_per_reply: int = 4):
        self.fail = list(fail or [])
        self.tasks_per_reply = tasks_per_reply
        self.lock = threading.Lock()
        self.requests = 0
        self.served = 0
        self.topic = 0
        self.usage_totals = {"prompt_tokens": 0, "completion_tokens": 0}

    def next_topics(self, n: int) -> list[str]:
        with self.lock:
            out = [
                TOPICS[(self.topic + i) % len(TOPICS)]
                + (f"（{(self.topic + i) // len(TOPICS)}）" if self.topic + i >= len(TOPICS) else "")
                for i in range(n)
            ]
            self.topic += n
        return out


def reply_for(state: StubState, prompt: str) -> str:
    if "JSON" in prompt:
        topics = state.next_topics(state.tasks_per_reply)
        tasks = [
            {
                "instruction": f"请用两三句话介绍{t}的来历和特点。",
                "input": "",
                "output": f"{t}是中国文化中很有代表性的事物，它历史悠久，特点鲜明，至今仍受到人们喜爱。",
            }
            for t in topics
        ]
        tasks.append({"instruction": tasks[0]["instruction"] + "。", "input": "", "output": "重复的任务。"})
        tasks.append(
            {
                "instruction": f"谈谈你对{topics[-1]}的看法。",
                "input": "",
                "output": "作为一个AI语言模型，我没有个人看法。",
            }
        )
        return "好的，以下是新的任务：\n```json\n" + json.dumps(tasks, ensure_ascii=False, indent=1) + "\n```"
    if "新的指令" in prompt:
        return f"请介绍一下{state.next_topics(1)[0]}。"
    return f"关于“{prompt[:20]}”，这里有一个简短的回答：它值得了解，也很有意思。"


class Handler(BaseHTTPRequestHandler):
    state: StubState

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(
                200, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "test"}]}
            )
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with st.lock:
            st.requests += 1
            status = st.fail.pop(0) if st.fail else 200
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if status != 200:
            return self._send(
                status,
                {
                    "error": {
                        "message": f"stub says {status}",
                        "type": "server_error" if status >= 500 else "rate_limit",
                    }
                },
                {"Retry-After": "0"} if status == 429 else None,
            )
        prompt = body["messages"][-1]["content"]
        content = reply_for(st, prompt)
        usage = {"prompt_tokens": len(prompt) // 2, "completion_tokens": len(content) // 2}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with st.lock:
            st.served += 1
            for k in ("prompt_tokens", "completion_tokens"):
                st.usage_totals[k] += usage[k]
        self._send(
            200,
            {
                "id": f"chatcmpl-{st.requests}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "stub"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
        )


class StubServer:
    """``with StubServer(fail=[429, 500]) as s: s.base_url ...``"""

    def __init__(self, **kw):
        self.state = StubState(**kw)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
