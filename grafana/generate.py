#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/ from the definitions below (dashboards as
code: edit here, run `python3 grafana/generate.py`, commit both). Every PromQL expression
is checked against a real Prometheus scraping a real engine by tests/prometheus.rs."""
import json
import sys
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'
RI = "$__rate_interval"


def templating():
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Engine", "type": "query", "datasource": DS,
         "definition": "label_values(fraudgate_build_info, instance)",
         "query": {"query": "label_values(fraudgate_build_info, instance)", "refId": "instances"},
         "includeAll": True, "multi": True, "allValue": ".+",
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
         "refresh": 2, "sort": 1, "hide": 0},
    ]}


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.y, self.x, self.row_h = [], 0, 0, 0

    def panel(self, kind, title, description, targets, unit, w=12, h=8, **extra):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        p = {
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l,
                 "range": True, "instant": False}
                for i, (e, l) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
            p["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 1, "fillOpacity": 10}
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        elif kind == "bargauge":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
        p.update(extra)
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["fraudgate"], "timezone": "browser", "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
            "templating": templating(), "annotations": {"list": []}, "links": [],
            "panels": self.panels,
        }


def quantile(q, metric, by="path"):
    return f'histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{I}}}[{RI}])))'


def rate_share(action):
    return (f'sum(rate(fraudgate_decisions_total{{{I},action="{action}"}}[{RI}]))'
            f' / sum(rate(fraudgate_decisions_total{{{I}}}[{RI}]))')


overview = Board("fraudgate-overview", "fraudgate / Overview",
                 "Throughput, decisions, latency, bad input and NATS health of the fraud engines.")
overview.panel("timeseries", "Throughput by path",
               "Transactions taken from NATS per second: check = request-reply (fraud.check), stream = fraud.txn.",
               [(f'sum by (path) (rate(fraudgate_transactions_received_total{{{I}}}[{RI}]))', "{{path}}")], "reqps")
overview.panel("timeseries", "Decision mix",
               "Decisions published per second, by action.",
               [(f'sum by (action) (rate(fraudgate_decisions_total{{{I}}}[{RI}]))', "{{action}}")], "reqps")
overview.panel("stat", "Hold rate", "Share of decisions sent to manual review.",
               [(rate_share("hold"), "hold")], "percentunit", w=6, h=5)
overview.panel("stat", "Reject rate", "Share of decisions rejected.",
               [(rate_share("reject"), "reject")], "percentunit", w=6, h=5)
overview.panel("stat", "NATS connected", "1: every selected engine is connected to NATS; 0: at least one is not.",
               [(f'min(fraudgate_nats_connected{{{I}}})', "connected")], "none", w=6, h=5)
overview.panel("stat", "Rules version", "The active rule set (label + content hash).",
               [(f'count by (version) (fraudgate_rules_info{{{I}}} == 1)', "{{version}}")], "none", w=6, h=5,
               options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "textMode": "name", "colorMode": "none", "graphMode": "none"})
overview.panel("timeseries", "End-to-end latency (receipt to publish)",
               "p50, p99 and p99.9 from the moment a message is taken from NATS to its decision being published, by path.",
               [(quantile(0.5, "fraudgate_end_to_end_duration_seconds"), "p50 {{path}}"),
                (quantile(0.99, "fraudgate_end_to_end_duration_seconds"), "p99 {{path}}"),
                (quantile(0.999, "fraudgate_end_to_end_duration_seconds"), "p99.9 {{path}}")], "s")
overview.panel("timeseries", "Engine decision time",
               "p50, p99 and p99.9 of the time spent inside the engine (windows, rules, dedupe) per decision.",
               [(quantile(0.5, "fraudgate_decision_duration_seconds"), "p50 {{path}}"),
                (quantile(0.99, "fraudgate_decision_duration_seconds"), "p99 {{path}}"),
                (quantile(0.999, "fraudgate_decision_duration_seconds"), "p99.9 {{path}}")], "s")
overview.panel("timeseries", "Invalid inputs by code, and failed decisions",
               "Refused inputs per second by stable error code (request-reply answers them; the stream forwards them to fraud.invalid), and transactions the engine failed to decide (a bug: answered or forwarded with the code internal).",
               [(f'sum by (code) (rate(fraudgate_invalid_inputs_total{{{I}}}[{RI}]))', "{{code}}"),
                (f'sum(rate(fraudgate_decision_failures_total{{{I}}}[{RI}]))', "internal (failed decisions)")], "reqps")
overview.panel("timeseries", "Retries",
               "Retries answered from the dedupe table (the original decision again, counted once) per second.",
               [(f'sum(rate(fraudgate_duplicates_total{{{I}}}[{RI}]))', "retries")], "reqps")
overview.panel("timeseries", "Waiting transactions",
               "Transactions the NATS client holds that intake has not taken yet (with JetStream, requests only: the stream's backlog waits on the server, as the consumer's pending count), transactions queued in the decision workers, by path, and stream decisions made and waiting for the stream connection to take them (the stream intake pauses once [service] queue_depth wait; requests are answered meanwhile).",
               [(f'sum(fraudgate_nats_pending_messages{{{I}}})', "in NATS client buffers"),
                (f'sum by (path) (fraudgate_in_flight{{{I}}})', "queued {{path}}"),
                (f'sum(fraudgate_decisions_unpublished{{{I}}})', "decisions waiting for the stream connection")], "short")
overview.panel("timeseries", "NATS connection state",
               "1 while an engine's NATS connections are up, 0 while it is reconnecting.",
               [(f'fraudgate_nats_connected{{{I}}}', "{{instance}}")], "bool_on_off")
overview.panel("timeseries", "NATS events",
               "Reconnects, disconnects and slow-consumer events (messages dropped by a full subscription) in each interval.",
               [(f'sum(increase(fraudgate_nats_reconnects_total{{{I}}}[{RI}]))', "reconnects"),
                (f'sum(increase(fraudgate_nats_disconnects_total{{{I}}}[{RI}]))', "disconnects"),
                (f'sum(increase(fraudgate_nats_slow_consumer_total{{{I}}}[{RI}]))', "slow-consumer events")], "short")
overview.panel("timeseries", "Stalls",
               "What the watchdog finds: decision workers holding one transaction longer than [service] stall_after, and whether the runtime's threads are all blocked (stalled now), and stalls found in each interval. A stalled worker holds every card routed to it; the engine log names the transaction.",
               [(f'sum by (kind) (fraudgate_stalled{{{I}}})', "stalled now: {{kind}}"),
                (f'sum by (kind) (increase(fraudgate_stalls_total{{{I}}}[{RI}]))', "stalls found: {{kind}}")], "short")

rules = Board("fraudgate-rules", "fraudgate / Rules",
              "What the rules do: hits per rule, shadow against active, reloads and the active version.")
rules.panel("timeseries", "Active rule hits",
            "Hits per second of each active rule.",
            [(f'sum by (rule) (rate(fraudgate_rule_hits_total{{{I},mode="active"}}[{RI}]))', "{{rule}}")], "reqps", w=24)
rules.panel("timeseries", "Shadow vs active",
            "Hits per second of shadow rules (evaluated and reported, never acting) against active ones.",
            [(f'sum by (mode) (rate(fraudgate_rule_hits_total{{{I}}}[{RI}]))', "{{mode}}")], "reqps")
rules.panel("bargauge", "Shadow rule hits (range)",
            "How often each shadow rule would have fired over the dashboard's time range: the candidates to activate.",
            [(f'sum by (rule) (increase(fraudgate_rule_hits_total{{{I},mode="shadow"}}[$__range]))', "{{rule}}")], "short")
rules.panel("bargauge", "Top rules by reject share",
            "For the rules that reject or block, their hits as a share of all rejected decisions (a decision can be rejected by several rules). Retries answered from the retry table count among the rejected decisions but not as rule hits, so the shares read low while the switch retries.",
            [(f'topk(10, sum by (rule) (rate(fraudgate_rule_hits_total{{{I},mode="active",action=~"reject|block"}}[{RI}]))'
              f' / scalar(sum(rate(fraudgate_decisions_total{{{I},action="reject"}}[{RI}]))))', "{{rule}}")], "percentunit")
rules.panel("timeseries", "Rule reloads",
            "Reloads in the interval by result; a failure keeps the previous rules active.",
            [(f'sum by (result) (increase(fraudgate_rule_reloads_total{{{I}}}[{RI}]))', "{{result}}")], "short")
rules.panel("stat", "Active version", "Label + content hash of the active rule set.",
            [(f'count by (version) (fraudgate_rules_info{{{I}}} == 1)', "{{version}}")], "none", w=6, h=5,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                     "textMode": "name", "colorMode": "none", "graphMode": "none"})
rules.panel("stat", "Rules loaded", "Rules in the active set, by mode.",
            [(f'max by (mode) (fraudgate_rules_loaded{{{I}}})', "{{mode}}")], "none", w=6, h=5)
rules.panel("stat", "Since last reload", "Time since the rules were last loaded successfully.",
            [(f'time() - max(fraudgate_rules_last_reload_timestamp_seconds{{{I}}})', "age")], "s", w=6, h=5)
rules.panel("stat", "Reload failures (24h)", "Failed reloads in the last 24 hours.",
            [(f'sum(increase(fraudgate_rule_reloads_total{{{I},result="failure"}}[24h]))', "failures")], "none", w=6, h=5)
rules.panel("stat", "Rule directory compiles", "1: the rule directory compiles now; 0: the last change failed and the previous rules are still active.",
            [(f'min(fraudgate_rules_dir_valid{{{I}}})', "valid")], "bool_yes_no", w=6, h=5)

state = Board("fraudgate-state", "fraudgate / State",
              "Window state: tracked keys, memory, evictions, late events and the dedupe table.")
state.panel("timeseries", "Tracked keys by key group",
            "Keys held per key group (card, device, merchant, composite keys ...).",
            [(f'sum by (group) (fraudgate_state_keys{{{I}}})', "{{group}}")], "short")
state.panel("timeseries", "Window state memory",
            "Estimated bytes of window state per key group (hash-table slots and heap blocks).",
            [(f'sum by (group) (fraudgate_state_bytes{{{I}}})', "{{group}}")], "bytes")
state.panel("timeseries", "Evictions",
            "Keys evicted after being idle longer than their longest window, keys evicted because their group reached max_keys (least recently used first: their history is lost), and transaction ids past the dedupe horizon, per second.",
            [(f'sum(rate(fraudgate_state_evicted_keys_total{{{I}}}[{RI}]))', "idle keys"),
             (f'sum by (group) (rate(fraudgate_state_capped_keys_total{{{I}}}[{RI}]))', "at cap: {{group}}"),
             (f'sum(rate(fraudgate_dedupe_evicted_total{{{I}}}[{RI}]))', "transaction ids")], "ops")
state.panel("timeseries", "Dedupe table",
            "Transaction ids remembered for retries.",
            [(f'sum(fraudgate_dedupe_entries{{{I}}})', "ids")], "short")
state.panel("timeseries", "Late and future events",
            "Events too late for their key's retention (decided, counted nowhere) and event times in the future replaced by the receive time, per second.",
            [(f'sum(rate(fraudgate_late_events_dropped_total{{{I}}}[{RI}]))', "too late"),
             (f'sum(rate(fraudgate_future_timestamps_clamped_total{{{I}}}[{RI}]))', "future, clamped")], "ops", w=24)
state.panel("timeseries", "Snapshot size",
            "Bytes of the last state snapshot written (window state and retry table), per engine.",
            [(f'max by (instance) (fraudgate_snapshot_bytes{{{I}}})', "{{instance}}")], "bytes", w=8)
state.panel("timeseries", "Snapshot time",
            "Seconds the last snapshot took (copy, encode, write, fsync), per engine. Decisions go on meanwhile.",
            [(f'max by (instance) (fraudgate_snapshot_duration_seconds{{{I}}})', "{{instance}}")], "s", w=8)
state.panel("stat", "Since last snapshot",
            "Age of the oldest engine's last good snapshot: without JetStream intake, what a restart of that engine would forget.",
            [(f'time() - min(fraudgate_snapshot_last_success_timestamp_seconds{{{I}}})', "age")], "s", w=4)
state.panel("stat", "Snapshot failures (24h)", "Snapshots that could not be written in the last 24 hours.",
            [(f'sum(increase(fraudgate_snapshots_total{{{I},result="failure"}}[24h]))', "failures")], "none", w=4)
state.panel("timeseries", "JetStream recovery and acks",
            "Transactions and requests each engine re-applied to the windows from JetStream at its last start (after the snapshot's cut; not decided or published again; set once, before the first scrape, so shown as is rather than as an increase), and acknowledgements that could not be sent or were withheld because the server did not confirm it had read the decision on the same connection (those messages come again and are answered from the dedupe table). Zero without [jetstream].",
            [(f'max by (instance, path) (fraudgate_replayed_transactions_total{{{I}}})', "re-applied at start: {{instance}} {{path}}"),
             (f'sum(rate(fraudgate_jetstream_ack_errors_total{{{I}}}[{RI}]))', "ack errors /s"),
             (f'sum(rate(fraudgate_jetstream_acks_withheld_total{{{I}}}[{RI}]))', "acks withheld /s")], "short", w=24)

OUT = "fraudgate_outcomes_total"
ROUT = "fraudgate_rule_outcomes_total"
FRAUD = 'outcome=~"chargeback|fraud"'


def over_30d(num, den):
    # Outcomes come days to weeks after their decisions: rates over 30 days, not the
    # dashboard's range.
    return f'sum(increase({num}[30d])) / sum(increase({den}[30d]))'


outcomes = Board("fraudgate-outcomes", "fraudgate / Outcomes",
                 "What became of decided transactions, as reported on fraud.outcome (chargebacks, refunds, confirmed fraud, confirmed genuine): chargeback and refund rates, fraud that got through, false positives, and each rule's precision on live traffic. An outcome is counted by whichever engine of the queue group takes it, not the one that decided: read the ratios with every engine selected.")
outcomes.panel("stat", "Chargeback rate (30d)",
               "Chargebacks reported in the last 30 days (whatever the decision) against approved decisions in the same 30 days. Chargebacks come weeks after their transactions, so this trails the traffic. Card schemes watch the same ratio per merchant (monthly chargebacks against transactions, acting around 1 %); this is the whole traffic's.",
               [(over_30d(f'{OUT}{{{I},outcome="chargeback"}}', f'fraudgate_decisions_total{{{I},action="approve"}}'), "chargebacks / approved")],
               "percentunit", w=6, h=5)
outcomes.panel("stat", "Refund rate (30d)",
               "Refunds reported in the last 30 days against approved decisions in the same 30 days.",
               [(over_30d(f'{OUT}{{{I},outcome="refund"}}', f'fraudgate_decisions_total{{{I},action="approve"}}'), "refunds / approved")],
               "percentunit", w=6, h=5)
outcomes.panel("stat", "Fraud approved (30d)",
               "Of the chargebacks and confirmed fraud reported with their decision in the last 30 days, the share the engine had approved: fraud that got through. Chargebacks count as fraud here (most card-not-present disputes are), and a transaction reported both ways counts twice.",
               [(over_30d(f'{OUT}{{{I},{FRAUD},action="approve"}}', f'{OUT}{{{I},{FRAUD},action!="unknown"}}'), "approved fraud")],
               "percentunit", w=6, h=5)
outcomes.panel("stat", "False positives among reviewed (30d)",
               "Of the held or rejected transactions with a verdict reported in the last 30 days (confirmed genuine, or fraud / chargeback), the share that was genuine.",
               [(over_30d(f'{OUT}{{{I},outcome="genuine",action=~"hold|reject"}}', f'{OUT}{{{I},outcome=~"genuine|fraud|chargeback",action=~"hold|reject"}}'), "genuine / verdicts")],
               "percentunit", w=6, h=5)
outcomes.panel("timeseries", "Outcomes reported",
               "Outcomes counted per second, by outcome (each transaction and outcome once).",
               [(f'sum by (outcome) (rate({OUT}{{{I}}}[{RI}]))', "{{outcome}}")], "reqps")
outcomes.panel("timeseries", "Outcomes by the decision's action",
               "Outcomes counted in each interval, by outcome and by the action of the decision sent with them (unknown: sent without it).",
               [(f'sum by (outcome, action) (increase({OUT}{{{I}}}[{RI}]))', "{{outcome}} after {{action}}")], "short")
outcomes.panel("bargauge", "Fraud reported among each rule's hits (30d)",
               "For each rule (active and shadow), chargebacks and confirmed fraud reported in the last 30 days for transactions it fired on, against its hits in those 30 days: its precision on live traffic. It reads low while fraud is still being reported (chargebacks take weeks) and for reject rules (a rejected transaction never gets a chargeback, only a confirmed-fraud report). It can read high: a transaction reported both as fraud and as a chargeback counts twice, and after a rule changes mode or condition, outcomes of its earlier hits keep coming against fewer hits. A shadow rule's figure is what it would catch if it acted. Rules without hits are left out.",
               [(f'sum by (rule, mode) (increase({ROUT}{{{I},{FRAUD}}}[30d]))'
                 f' / (sum by (rule, mode) (increase(fraudgate_rule_hits_total{{{I}}}[30d])) > 0)', "{{rule}} ({{mode}})")],
               "percentunit")
outcomes.panel("bargauge", "Outcomes per rule (range)",
               "Outcomes reported over the dashboard's time range for transactions each rule fired on, by outcome.",
               [(f'sum by (rule, outcome) (increase({ROUT}{{{I}}}[$__range])) > 0', "{{rule}}: {{outcome}}")], "short")
outcomes.panel("timeseries", "Outcome messages repeated and refused",
               "Outcomes reported again within 24 hours to the same engine (not counted again), outcome messages refused, by error code (answered with the error, or forwarded to fraud.invalid), and outcome messages lost (dropped by a full subscription, or their answer not published), per second.",
               [(f'sum(rate(fraudgate_outcomes_repeated_total{{{I}}}[{RI}]))', "repeated"),
                (f'sum by (code) (rate(fraudgate_outcomes_refused_total{{{I}}}[{RI}]))', "refused: {{code}}"),
                (f'sum by (reason) (rate(fraudgate_outcomes_lost_total{{{I}}}[{RI}]))', "lost: {{reason}}")], "reqps", w=24)

here = os.path.dirname(os.path.abspath(__file__))
# --check: write nothing, fail if a committed dashboard differs from what this script makes
# (an edit of the JSON by hand, or of this script without running it).
check = "--check" in sys.argv[1:]
stale = []
for b in (overview, rules, state, outcomes):
    path = os.path.join(here, "dashboards", f"{b.uid}.json")
    text = json.dumps(b.json(), indent=2) + "\n"
    if check:
        with open(path) as f:
            if f.read() != text:
                stale.append(path)
        continue
    with open(path, "w") as f:
        f.write(text)
    print(f"dashboards/{b.uid}.json: {len(b.panels)} panels")
if stale:
    sys.exit("not what grafana/generate.py makes (run it and commit the result): " + ", ".join(stale))
