"""The parts' shard lists and how a part's end is classified (trustflow_ray.runner),
without a cluster or the binary (the error classes need Ray importable)."""

import unittest

from trustflow_ray import report as reportlib
from trustflow_ray import runner

try:
    from ray.exceptions import RayTaskError, WorkerCrashedError
except ImportError:  # the pure-Python checks still run
    RayTaskError = WorkerCrashedError = None


def planned(n):
    return [{"index": i, "stem": f"s{i}", "input": f"s3://b/raw/s{i}.parquet", "rows": 10}
            for i in range(n)]


class ShardListTest(unittest.TestCase):
    def test_each_part_gets_its_own_shards_in_index_order(self):
        shards = planned(10)
        lists = runner.part_shards(shards, 4)
        self.assertEqual(len(lists), 4)
        self.assertEqual([s["index"] for s in lists[1]], [1, 5, 9])
        self.assertEqual([s["index"] for s in lists[3]], [3, 7])
        for part, mine in enumerate(lists):
            for s in mine:
                self.assertEqual(reportlib.part_of(s["index"], 4), part)
                self.assertIs(s, shards[s["index"]])  # the plan's entry, not a copy
        # Every shard in exactly one list.
        got = sorted(s["index"] for mine in lists for s in mine)
        self.assertEqual(got, list(range(10)))

    def test_plan_indexes_are_kept_not_positions(self):
        # The plan's indexes, even where a list of shards is not 0..S-1 in order.
        shards = [{"index": 2, "input": "/in/b.parquet"}, {"index": 7, "input": "/in/a.parquet"},
                  {"index": 4, "input": "/in/c.parquet"}]
        lists = runner.part_shards(shards, 2)
        self.assertEqual([[s["index"] for s in mine] for mine in lists], [[2, 4], [7]])

    def test_more_parts_than_shards_leaves_empty_lists(self):
        self.assertEqual(runner.part_shards(planned(2), 3)[2], [])

    def test_the_file_and_the_command_line(self):
        body = runner.shard_list("H", 1, 4, [{"index": 1, "input": "/in/s1.parquet"}])
        self.assertEqual(body, {"pipeline_hash": "H", "part": [1, 4],
                                "shards": [{"index": 1, "input": "/in/s1.parquet"}]})
        overrides = ["--input", "/in/a", "--out", "s3://b/out", "--input", "/in/b"]
        self.assertEqual(runner.part_overrides(overrides), ["--out", "s3://b/out"])
        self.assertEqual(runner.part_overrides(["--input", "/in"]), [])
        spec = {"binary": "/opt/tf", "pipeline": "/p.yaml",
                "overrides": runner.part_overrides(overrides), "parts": 4,
                "pipeline_hash": "H"}
        self.assertEqual(
            runner.part_argv(spec, "/tmp/x/shards.json", "/tmp/x/report.json"),
            ["/opt/tf", "run", "/p.yaml", "--out", "s3://b/out",
             "--shards", "/tmp/x/shards.json", "--quiet", "--report", "/tmp/x/report.json"])


CTX = {"node_ip": "10.0.0.1", "host": "h", "node_id": "abcdef0123456789"}
SPEC = {"binary": "/opt/tf", "parts": 4}


class PartErrorTest(unittest.TestCase):
    def test_exit_codes_map_to_types(self):
        self.assertIsInstance(runner.part_error(SPEC, 1, CTX, 1, "boom"), runner.PartFailed)
        self.assertIsInstance(runner.part_error(SPEC, 1, CTX, -9, ""), runner.PartFailed)
        refused = runner.part_error(SPEC, 1, CTX, 2, "pipeline hash differs")
        self.assertIsInstance(refused, runner.PartRefused)
        self.assertIn("not retried", str(refused))
        self.assertIsInstance(runner.part_error(SPEC, 1, CTX, 127, ""), runner.NodeSetupError)
        self.assertIsInstance(
            runner.part_error(SPEC, 1, CTX, 1, "error while loading shared libraries: x.so"),
            runner.NodeSetupError)
        # Only PartFailed is retried (run_part's retry_exceptions).
        self.assertFalse(issubclass(runner.PartRefused, runner.PartFailed))
        self.assertFalse(issubclass(runner.NodeSetupError, runner.PartFailed))


@unittest.skipIf(RayTaskError is None, "Ray is not importable")
class PartOutcomeTest(unittest.TestCase):
    def ray_error(self, cause):
        """What ray.get raises for a task that raised `cause`."""
        return RayTaskError("run_part", "Traceback ...", cause).as_instanceof_cause()

    def test_node_setup_error_is_found_by_type(self):
        e = self.ray_error(runner.NodeSetupError("node 10.0.0.1: libtorch_cpu.so missing"))
        o = runner.PartOutcome.failed(3, e)
        self.assertTrue(o.node_setup)
        self.assertIsNone(o.result)
        self.assertEqual(o.error, "NodeSetupError: node 10.0.0.1: libtorch_cpu.so missing")

    def test_a_message_naming_it_is_not_one(self):
        o = runner.PartOutcome.failed(0, self.ray_error(
            runner.PartFailed("trustflow exited with exit code 1: NodeSetupError in a caption")))
        self.assertFalse(o.node_setup)
        self.assertTrue(o.error.startswith("PartFailed: "))

    def test_lost_worker_is_its_own_cause(self):
        o = runner.PartOutcome.failed(0, WorkerCrashedError())
        self.assertFalse(o.node_setup)
        self.assertTrue(o.error.startswith("WorkerCrashedError: "))

    def test_outcomes_add_up(self):
        outcomes = runner.Outcomes()
        outcomes.add(runner.PartOutcome(0, result={"report": {"rows_in": 5}}))
        outcomes.add(runner.PartOutcome.failed(
            1, self.ray_error(runner.NodeSetupError("no binary"))))
        self.assertEqual((len(outcomes), outcomes.rows_done), (2, 5))
        self.assertEqual(outcomes.failures, {1: "NodeSetupError: no binary"})
        self.assertTrue(outcomes.node_setup_failed)


if __name__ == "__main__":
    unittest.main()


class CommandLineTest(unittest.TestCase):
    """What the runner is given is checked before anything starts."""

    def parse(self, *extra):
        from trustflow_ray.__main__ import parser

        return parser().parse_args(["run", "p.yaml", *extra])

    def test_a_part_count_below_one_is_refused(self):
        import contextlib
        import io

        for value in ("0", "-3", "four"):
            err = io.StringIO()
            with self.assertRaises(SystemExit) as e, contextlib.redirect_stderr(err):
                self.parse("--parts", value)
            self.assertEqual(e.exception.code, 2, value)
            self.assertIn("--parts", err.getvalue())
            self.assertIn(value, err.getvalue())
        self.assertEqual(self.parse("--parts", "4").parts, 4)
        self.assertIsNone(self.parse().parts)

    def test_negative_retries_and_resources_are_refused(self):
        import contextlib
        import io

        for flag in ("--max-retries", "--num-cpus", "--num-gpus"):
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                self.parse(flag, "-1")
        self.assertEqual(self.parse("--num-cpus", "0.5").num_cpus, 0.5)
