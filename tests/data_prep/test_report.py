from data_prep.report import grid_image, source_metrics, summary_table
from data_prep.schema import Sample, SampleMeta, encode_sample
from data_prep.shards import write_tar
from tests.data_prep.curate_fixtures import encode, pattern

RESULTS = [
    {
        "source": "a",
        "inputs": 10,
        "kept": 7,
        "rejected": 3,
        "bytes": 4096,
        "seconds": 2.0,
        "rejects_by_reason": {"too_small": 2, "duplicate_near": 1},
    },
    {"source": "b", "inputs": 5, "kept": 5, "rejected": 0, "bytes": 1024, "seconds": 1.0, "rejects_by_reason": {}},
]


def test_summary_table_rows_and_totals():
    lines = summary_table(RESULTS, wall_s=3.0).splitlines()
    row_a = next(line for line in lines if line.startswith("a "))
    assert row_a.split()[:6] == ["a", "10", "7", "3", "4096", "5.0"]
    assert row_a.endswith("duplicate_near=1, too_small=2")
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[:6] == ["total", "15", "12", "3", "5120", "5.0"]


def test_source_metrics():
    m = source_metrics(RESULTS, wall_s=3.0)
    assert m["a.rejected.too_small"] == 2 and m["b.kept"] == 5 and m["images_per_s"] == 5.0


def test_grid_image(tmp_path):
    samples = [
        Sample(
            key=f"k{i}",
            meta=SampleMeta(source="s", source_key=str(i), task="t2i"),
            image=encode(pattern(i, (64, 48))),
            image_ext="png",
            text="x",
        )
        for i in range(20)
    ]
    write_tar(tmp_path / "s-000000.tar", [encode_sample(s) for s in samples])
    grid = grid_image([tmp_path / "s-000000.tar"], seed=0)
    assert grid.size == (384, 384)
    assert grid_image([tmp_path / "s-000000.tar"], seed=0).tobytes() == grid.tobytes()
    assert grid.getpixel((3 * 96 + 5, 3 * 96 + 5)) != (255, 255, 255)  # all 16 cells filled
