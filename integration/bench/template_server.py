import hashlib, http.server, os
state = {"count": 0}
big = bytearray(os.urandom(1 << 20)) * 32
table = {i: str(i) * 10 for i in range(100000)}
with open("/tmp/state.txt", "w") as f:  # the container's /tmp (a tmpfs) is state too
    f.write("init")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/count":
            state["count"] += 1
            body = str(state["count"])
        elif self.path.startswith("/write/"):
            tag = self.path[7:]
            big[0:len(tag)] = tag.encode()
            table["tag"] = tag
            with open("/tmp/state.txt", "w") as f:
                f.write(tag)
            body = "ok"
        elif self.path == "/tmpfile":
            with open("/tmp/state.txt") as f:
                body = f.read()
        elif self.path == "/read":
            body = bytes(big[0:8]).hex() + "|" + str(table.get("tag", ""))
        elif self.path == "/probe":
            # Cheap and state-dependent: one byte of every page of the state, and the dict.
            body = hashlib.sha256(bytes(big[::4096])).hexdigest() + "|" + str(len(table))
        elif self.path == "/sum":
            body = hashlib.sha256(big).hexdigest()
        elif self.path == "/churn":
            # Allocate, free and reallocate heavily, give free heap pages back with
            # malloc_trim (MADV_DONTNEED inside the template-backed heap), then compute a
            # known answer from fresh allocations.
            import ctypes, random
            rnd = random.Random(7)
            for _ in range(20):
                junk = [bytearray(rnd.randrange(16, 4096)) for _ in range(2000)]
                del junk
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            zeros = ctypes.create_string_buffer(1 << 16)
            assert zeros.raw == bytes(1 << 16), "calloc'd memory not zero"
            rows = [[rnd.random() for _ in range(50)] for _ in range(2000)]
            body = hashlib.sha256(repr(sorted(map(sum, rows))).encode()).hexdigest()
        else:
            body = "hello"
        b = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
