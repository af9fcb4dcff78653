"""pyaes: AES-128-CTR in pure Python (aes128.py, self-tested against FIPS-197 at import)
encrypting a fixed 16 KiB plaintext with a fixed key. Answer: sha256 hex of the ciphertext."""
import hashlib

import aes128

NAME = "pyaes"
KEY = bytes(range(16))
COUNTER = bytes.fromhex("000102030405060708090a0b00000000")
PLAINTEXT = (b"The quick brown fox jumps over the lazy dog. " * 400)[:16384]


def run():
    ciphertext = aes128.ctr_encrypt(KEY, COUNTER, PLAINTEXT)
    if aes128.ctr_encrypt(KEY, COUNTER, ciphertext) != PLAINTEXT:  # CTR decrypt == encrypt
        raise ArithmeticError("AES-CTR round trip failed")
    return hashlib.sha256(ciphertext).hexdigest()


if __name__ == "__main__":
    print(run())
