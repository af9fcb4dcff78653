# The heavy-import function: numpy's import (hundreds of modules and shared libraries) is the
# start-up a template saves; 32 MiB of state in a numpy array.
import hashlib, http.server
import numpy as np
state = {"count": 0}
arr = np.random.default_rng(7).random(4 << 20)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/count":
            state["count"] += 1
            body = str(state["count"])
        elif self.path == "/probe":
            # One value of every page of the array.
            body = hashlib.sha256(arr[::512].tobytes()).hexdigest() + "|" + str(arr.size)
        elif self.path == "/sum":
            body = hashlib.sha256(arr.tobytes()).hexdigest() + "|" + repr(float(arr.sum()))
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
