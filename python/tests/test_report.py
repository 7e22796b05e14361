"""Merging part reports (trustflow_ray.report), without Ray or the binary."""

import unittest

from trustflow_ray import report as r


def plan(n):
    return {"pipeline": "p", "pipeline_hash": "H", "out_dir": "/o", "unreadable": [],
            "shards": [{"index": i, "stem": f"s{i}", "input": f"/in/s{i}.parquet", "rows": 10}
                       for i in range(n)]}


def part_report(stems, status="done", hash_="H", wall=1.0, quarantined=0):
    shards = [{"stem": s, "input": f"/in/{s}.parquet", "status": status, "rows_in": 10,
               "rows_out": 10 - quarantined, "rows_quarantined": quarantined,
               "invariant_holds": True,
               "quarantine_reasons": {"bad": quarantined} if quarantined else {}}
              for s in stems]
    return {"pipeline_hash": hash_, "wall_s": wall, "rows_in": 10 * len(stems),
            "shards": shards, "unreadable": [],
            "steps": [{"name": "source", "workers": 1, "rows_in": 10 * len(stems),
                       "rows_out": 10 * len(stems), "rows_quarantined": 0, "batches": 1,
                       "busy_s": 0.5, "busy_fraction": 0.5, "blocked_fraction": 0.0,
                       "starved_fraction": 0.0, "queue_fill_mean": 0.0, "queue_fill_max": 0.0}],
            "storage": {"requests": 3, "gets": 2}}


class MergeTest(unittest.TestCase):
    def test_two_parts_add_up(self):
        results = {0: {"report": part_report(["s0", "s2"], quarantined=1)},
                   1: {"report": part_report(["s1", "s3"], status="skipped")}}
        attempts = {0: [{"outcome": "lost"}, {"outcome": "ok"}], 1: [{"outcome": "ok"}]}
        m = r.merge(plan(4), 2, results, {}, attempts, wall_s=2.0)
        self.assertTrue(m["complete"], m["problems"])
        self.assertEqual((m["rows_in"], m["rows_out"], m["rows_quarantined"]), (40, 38, 2))
        self.assertTrue(m["invariant_holds"])
        self.assertEqual(m["quarantine_reasons"], {"bad": 2})
        self.assertEqual([s["stem"] for s in m["shards"]], ["s0", "s1", "s2", "s3"])
        self.assertEqual((m["shards_processed"], m["shards_skipped"]), (2, 2))
        self.assertEqual(m["retries"], 1)
        self.assertEqual(m["rows_per_s"], 10.0)  # 20 rows processed now / 2 s
        self.assertEqual(m["steps"][0]["rows_in"], 40)
        self.assertEqual(m["storage"], {"requests": 6, "gets": 4})

    def test_disagreements_are_problems(self):
        results = {0: {"report": part_report(["s0", "s1"], hash_="other")}}
        m = r.merge(plan(4), 2, results, {}, {}, wall_s=1.0)
        self.assertFalse(m["complete"])
        text = "\n".join(m["problems"])
        self.assertIn("pipeline hash other differs", text)
        self.assertIn("s1 (index 1) belongs to part 1", text)
        self.assertIn("in no part's report", text)

    def test_failed_part_is_reported_not_missing(self):
        results = {0: {"report": part_report(["s0"])}}
        m = r.merge(plan(2), 2, results, {1: "PartFailed: boom"}, {}, wall_s=1.0)
        self.assertFalse(m["complete"])
        self.assertEqual(m["parts_failed"], [{"part": 1, "error": "PartFailed: boom"}])
        self.assertEqual(m["problems"], [])

    def test_unreadable_at_planning_comes_from_the_plan(self):
        # Parts given their own shard lists list nothing: only the plan knows the
        # shards of the whole source it could not read.
        p = dict(plan(2), unreadable=["/in/broken.parquet"])
        bad = {"input": "/in/s1.parquet", "reason": "footer: bad magic"}
        results = {0: {"report": part_report(["s0"])},
                   1: {"report": dict(part_report([]), unreadable=[bad])}}
        m = r.merge(p, 2, results, {}, {}, wall_s=1.0)
        self.assertEqual(m["unreadable"], [bad, {"input": "/in/broken.parquet",
                                                 "reason": r.PLANNED_UNREADABLE}])
        self.assertEqual(m["problems"], [])  # s1 is unreadable, not missing
        # A part that also names it (as `--part I/N` does) is not counted twice.
        old_style = {"input": "/in/broken.parquet", "reason": "not Parquet"}
        results[0]["report"]["unreadable"] = [old_style]
        m = r.merge(p, 2, results, {}, {}, wall_s=1.0)
        self.assertEqual(m["unreadable"], [old_style, bad])


if __name__ == "__main__":
    unittest.main()
