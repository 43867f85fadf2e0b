"""The public API is exactly ``hami_ray.__all__`` (as httpx's test_exported_members)."""

import hami_ray


def test_all_exports_exist_and_are_sorted() -> None:
    assert sorted(hami_ray.__all__) == hami_ray.__all__
    for name in hami_ray.__all__:
        assert hasattr(hami_ray, name), name


def test_no_unlisted_public_members() -> None:
    public = {n for n in dir(hami_ray) if not n.startswith("_") and n not in {"core", "sim", "cli", "runtime", "wire", "observe", "k8s", "Any", "serve"}}
    assert public <= set(hami_ray.__all__)
