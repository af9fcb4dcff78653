"""html: dynamic HTML with jinja2 -- a page with a 1000-row table rendered on every call.
Answer: "<sha256 hex of the page> <length in bytes>"."""
import hashlib
import random

import jinja2

NAME = "html"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{{ title }}</title></head>
<body>
<h1>{{ title }}</h1>
<p>{{ rows|length }} orders, total {{ "%.2f"|format(rows|sum(attribute="total")) }} EUR</p>
<table>
<thead><tr>{% for h in headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rows %}<tr class="{{ loop.cycle('odd', 'even') }}{% if r.total > 900 %} big{% endif %}">
<td>{{ r.id }}</td><td>{{ r.customer }}</td><td>{{ r.item|upper }}</td><td>{{ r.qty }}</td>
<td>{{ "%.2f"|format(r.price) }}</td><td>{{ "%.2f"|format(r.total) }}</td><td>{{ r.note|e }}</td></tr>
{% endfor %}</tbody>
</table>
</body>
</html>
"""


def _rows():
    rnd = random.Random(4242)
    names = ["Ada", "Grace", "Linus", "Ken", "Dennis", "Barbara", "Edsger", "Donald", "Niklaus", "Frances"]
    items = ["widget", "gadget", "sprocket", "gizmo", "doohickey", "thingamajig"]
    rows = []
    for i in range(1000):
        qty = rnd.randint(1, 20)
        price = rnd.randint(100, 5000) / 100
        rows.append({"id": i + 1, "customer": "%s %s." % (rnd.choice(names), chr(65 + rnd.randint(0, 25))),
                     "item": rnd.choice(items), "qty": qty, "price": price, "total": qty * price,
                     "note": "<b>rush</b> & fragile" if i % 7 == 0 else ""})
    return rows


ROWS = _rows()
ENV = jinja2.Environment(autoescape=True)


def run():
    # compile + render each call, like a function that loads its template per request
    page = ENV.from_string(TEMPLATE).render(title="Orders report", headers=[
        "#", "Customer", "Item", "Qty", "Price", "Total", "Note"], rows=ROWS).encode()
    return "%s %d" % (hashlib.sha256(page).hexdigest(), len(page))


if __name__ == "__main__":
    print(run())
