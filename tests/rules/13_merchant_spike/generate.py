#!/usr/bin/env python3
"""Generates transactions.jsonl and expected.jsonl for the merchant_spike case from an
independent model of the rule (not from the engine):
  fire iff m5 >= 30 and (m60 - m5) >= 30 and m5 * 11 > 3 * (m60 - m5)
where m5 / m60 count the merchant's transactions in (t - 5 min, t] / (t - 1 h, t].
Run it from this directory after changing the rule, then review the diff."""
import json
from datetime import datetime, timedelta, timezone

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
events = []  # (ts, merchant)
# Merchant A: a cold start, 35 transactions 5 s apart with no history: never a spike.
events += [(T0 + timedelta(seconds=5 * i), "m-cold-start") for i in range(35)]
# Merchant B: 60 transactions in the hour, then a burst 1 every 2 s from 12:55.
events += [(T0 + timedelta(seconds=50 * i), "m-steady-b") for i in range(60)]
events += [(T0 + timedelta(minutes=55, seconds=2 * j), "m-steady-b") for j in range(40)]
# Merchant C: 120 in the hour before; the burst fires only at its 33rd (363 > 360).
events += [(T0 + timedelta(seconds=25 * i), "m-steady-c") for i in range(120)]
events += [(T0 + timedelta(minutes=55, seconds=2 * j), "m-steady-c") for j in range(40)]
events.sort(key=lambda e: (e[0], e[1]))

tx, exp, seen = [], [], []
for n, (ts, m) in enumerate(events):
    seen.append((ts, m))
    m5 = sum(1 for t, mm in seen if mm == m and ts - timedelta(minutes=5) < t <= ts)
    m60 = sum(1 for t, mm in seen if mm == m and ts - timedelta(hours=1) < t <= ts)
    prev = m60 - m5
    fire = m5 >= 30 and prev >= 30 and m5 * 11 > 3 * prev
    tid = f"ms-{n + 1:03d}"
    tx.append({
        "id": tid, "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "card": f"41111113{n:08d}",
        "amount": f"{20 + n % 50}.{n % 100:02d}", "currency": "EUR", "device": f"dev-{n:04d}",
        "merchant": m, "region": "DE", "mcc": 5999,
        "attrs": {"merchant_age_days": 730, "phone_match": True, "address_match": True,
                  "ip_country": "DE", "channel": "ecom", "device_age_days": 120},
    })
    e = {"id": tid, "action": "approve", "score": 40 if fire else 0, "decided_by": "default",
         "rules": ["merchant_spike"] if fire else []}
    if fire:
        e["values"] = {"merchant_spike": {"merchant_txn_5m": m5, "merchant_txn_1h": m60}}
    exp.append(e)

with open("transactions.jsonl", "w") as f:
    f.writelines(json.dumps(t, separators=(",", ":")) + "\n" for t in tx)
with open("expected.jsonl", "w") as f:
    f.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in exp)
print(len(tx), "transactions,", sum(1 for e in exp if e["rules"]), "spikes")
