"""json: JSON serialisation round trips of a fixed generated document (~400 KB).

Answer: sha256 hex of the canonical dump (sorted keys, compact separators).
"""
import hashlib
import json
import random

NAME = "json"
ROUNDS = 4


def _document():
    rnd = random.Random(20230610)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa"]
    users = []
    for i in range(1500):
        users.append({
            "id": i,
            "name": "%s %s" % (rnd.choice(words).title(), rnd.choice(words).title()),
            "email": "user%d@example.org" % i,
            "active": rnd.random() < 0.7,
            "score": round(rnd.uniform(0, 1000), 3),
            "tags": rnd.sample(words, 4),
            "address": {"street": "%d %s street" % (rnd.randint(1, 999), rnd.choice(words)),
                        "zip": "%05d" % rnd.randint(0, 99999),
                        "geo": [round(rnd.uniform(-90, 90), 6), round(rnd.uniform(-180, 180), 6)]},
            "history": [rnd.randint(0, 10 ** 6) for _ in range(8)],
            "note": None if i % 5 else "caf\u00e9 \u2603 \"quoted\" \\ line\nbreak",
        })
    return {"version": 3, "generator": "trenv-functions", "users": users}


DOC = _document()


def run():
    text = json.dumps(DOC)
    for _ in range(ROUNDS):
        text = json.dumps(json.loads(text), indent=1)
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


if __name__ == "__main__":
    print(len(json.dumps(DOC)), run())
