//! The tests' HTTP side: a Python function with initialised state, and a GET from the host.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::wait_for;

/// A function with state worth a template: 16 MiB made at start-up (then a 1 s "import"),
/// served on :8080 with a count of requests; `/` counts, `/ready` does not (it is the
/// readiness probe). Answers `fn=<FN> count=<n> state=<bytes>`.
pub const COUNTING_FUNCTION: &str = r#"
import os, socket, time
from http.server import BaseHTTPRequestHandler, HTTPServer
STATE = [bytearray(os.urandom(1 << 20)) for _ in range(16)]
time.sleep(1.0)
count = 0
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        if self.path == "/":
            count += 1
            print("served %d" % count, flush=True)
        body = ("fn=%s count=%d state=%d\n" % (os.environ.get("FN", "?"), count, sum(len(b) for b in STATE))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;

/// One GET of `path` from `ip:port`: the whole response when its status is 200.
pub fn get_once(ip: &str, port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect((ip, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.contains(" 200 ").then_some(response)
}

/// GET retried for up to `timeout`; the response, or a panic that names the address.
pub fn get(ip: &str, port: u16, path: &str, timeout: Duration) -> String {
    wait_for(timeout, || get_once(ip, port, path))
        .unwrap_or_else(|| panic!("no HTTP answer from {ip}:{port}{path}"))
}

/// The body's last line of [`get`] (the function's answer).
pub fn get_body(ip: &str, port: u16, path: &str, timeout: Duration) -> String {
    get(ip, port, path, timeout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}
