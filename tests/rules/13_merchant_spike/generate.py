#!/usr/bin/env python3
"""Generates transactions.jsonl and expected.jsonl for the merchant_spike case from an
independent model of the rule (not from the engine):
  fire iff m5 >= 30 and (m60 - m5) >= 30 and m5 * 11 > 3 * (m60 - m5) and m120 > m60
where m5 / m60 / m120 count the merchant's transactions in (t - 5 min, t] / (t - 1 h, t] /
(t - 2 h, t]: the last condition says the engine saw the merchant more than an hour ago.
Run it from this directory after changing the rule, then review the diff."""
import json
from datetime import datetime, timedelta, timezone

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
events = []  # (ts, merchant)
# Merchant A: a cold start, 35 transactions 5 s apart with no history: never a spike.
events += [(T0 + timedelta(seconds=5 * i), "m-cold-start") for i in range(35)]
# Merchant B: seen once at 11:30, 60 transactions in the hour from 12:00, then a burst
# 1 every 2 s from 12:55.
events += [(T0 - timedelta(minutes=30), "m-steady-b")]
events += [(T0 + timedelta(seconds=50 * i), "m-steady-b") for i in range(60)]
events += [(T0 + timedelta(minutes=55, seconds=2 * j), "m-steady-b") for j in range(40)]
# Merchant C: likewise, 120 in the hour before; the burst fires only at its 33rd (363 > 360).
events += [(T0 - timedelta(minutes=30), "m-steady-c")]
events += [(T0 + timedelta(seconds=25 * i), "m-steady-c") for i in range(120)]
events += [(T0 + timedelta(minutes=55, seconds=2 * j), "m-steady-c") for j in range(40)]
# Merchant D: busy from the engine's first transaction (1 every 10 s from 12:00 to 12:25)
# with nothing before: from 12:10 its counts alone meet the first three conditions (30 in
# 5 min, 30 or more in the 55 minutes "before"), but the engine has no hour of its
# history, so it never fires. This is what a start without the snapshot looks like.
events += [(T0 + timedelta(seconds=10 * i), "m-busy-d") for i in range(150)]
events.sort(key=lambda e: (e[0], e[1]))

tx, exp, seen = [], [], []
busy_d_without_history = 0
for n, (ts, m) in enumerate(events):
    seen.append((ts, m))
    m5 = sum(1 for t, mm in seen if mm == m and ts - timedelta(minutes=5) < t <= ts)
    m60 = sum(1 for t, mm in seen if mm == m and ts - timedelta(hours=1) < t <= ts)
    m120 = sum(1 for t, mm in seen if mm == m and ts - timedelta(hours=2) < t <= ts)
    prev = m60 - m5
    fire = m5 >= 30 and prev >= 30 and m5 * 11 > 3 * prev and m120 > m60
    if m == "m-busy-d":
        # Without the history condition D would fire: the case must show that.
        assert not fire
        busy_d_without_history += m5 >= 30 and prev >= 30 and m5 * 11 > 3 * prev
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
        e["values"] = {"merchant_spike": {"merchant_txn_5m": m5, "merchant_txn_1h": m60,
                                          "merchant_txn_2h": m120}}
    exp.append(e)

with open("transactions.jsonl", "w") as f:
    f.writelines(json.dumps(t, separators=(",", ":")) + "\n" for t in tx)
with open("expected.jsonl", "w") as f:
    f.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in exp)
assert busy_d_without_history > 0
print(len(tx), "transactions,", sum(1 for e in exp if e["rules"]), "spikes;",
      busy_d_without_history, "of D's would fire without the history condition")
