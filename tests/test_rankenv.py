"""dptrain.distributed.rankenv: environments as srun, mpirun and a hand export set them, compared against the
rank each process must get; inconsistent environments must raise an error naming the variable."""
import pytest

from dptrain.distributed.rankenv import RankEnv, RankEnvError, from_env

SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_JOB_ID": "123"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"}
PLAIN = {"DPTRAIN_RANK": "2", "DPTRAIN_WORLD_SIZE": "3", "DPTRAIN_LOCAL_RANK": "0"}


def test_nothing_set():
    assert from_env({}) is None
    assert from_env({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}) is None  # salloc shell, no task yet


def test_each_source():
    assert from_env(SLURM) == RankEnv(5, 8, 1, "slurm", node_rank=2)
    assert from_env(OMPI) == RankEnv(3, 4, 1, "openmpi", node_rank=1, local_world_size=2)
    assert from_env(PLAIN) == RankEnv(2, 3, 0, "dptrain")
    assert from_env({"DPTRAIN_RANK": " 0 ", "DPTRAIN_WORLD_SIZE": "1"}) == RankEnv(0, 1, 0, "dptrain")


def test_precedence_dptrain_then_openmpi_then_slurm():
    # mpirun inside an allocation inherits the batch step's SLURM_PROCID=0; OMPI_* is the per-process truth
    batch = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert from_env({**batch, **OMPI}).source == "openmpi"
    assert from_env({**batch, **OMPI, **PLAIN}).source == "dptrain"


def test_reads_os_environ_by_default(monkeypatch):
    for var in [*SLURM, *OMPI, *PLAIN, "DPTRAIN_NODE_RANK", "DPTRAIN_LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DPTRAIN_RANK", "1")
    monkeypatch.setenv("DPTRAIN_WORLD_SIZE", "2")
    assert from_env() == RankEnv(1, 2, 0, "dptrain")


@pytest.mark.parametrize("env, match", [
    ({"DPTRAIN_RANK": "1"}, "DPTRAIN_WORLD_SIZE is not set"),
    ({"DPTRAIN_WORLD_SIZE": "2"}, "DPTRAIN_WORLD_SIZE is set but DPTRAIN_RANK is not"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not"),
    ({**PLAIN, "DPTRAIN_RANK": "two"}, "DPTRAIN_RANK='two' is not a non-negative integer"),
    ({**PLAIN, "DPTRAIN_RANK": "-1"}, "DPTRAIN_RANK='-1'"),
    ({**PLAIN, "DPTRAIN_RANK": ""}, "DPTRAIN_RANK=''"),
    ({**PLAIN, "DPTRAIN_RANK": "3"}, "DPTRAIN_RANK=3 is not below DPTRAIN_WORLD_SIZE=3"),
    ({**PLAIN, "DPTRAIN_WORLD_SIZE": "0", "DPTRAIN_RANK": "0"}, "DPTRAIN_WORLD_SIZE=0 must be at least 1"),
    ({**PLAIN, "DPTRAIN_LOCAL_RANK": "x"}, "DPTRAIN_LOCAL_RANK='x'"),
    ({**PLAIN, "DPTRAIN_LOCAL_RANK": "3", "DPTRAIN_RANK": "2"}, "DPTRAIN_LOCAL_RANK=3 exceeds DPTRAIN_RANK=2"),
    ({**PLAIN, "DPTRAIN_LOCAL_WORLD_SIZE": "9"}, r"DPTRAIN_LOCAL_WORLD_SIZE=9 is not in 1..3 \(DPTRAIN_WORLD_SIZE\)"),
    ({**SLURM, "SLURM_NTASKS": "4"}, "SLURM_PROCID=5 is not below SLURM_NTASKS=4"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
    ({**SLURM, "SLURM_NODEID": "7"}, "SLURM_NODEID=7 exceeds SLURM_PROCID=5"),
    ({**OMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK=2 is not below "
                                                  "OMPI_COMM_WORLD_LOCAL_SIZE=2"),
    ({**OMPI, "OMPI_COMM_WORLD_NODE_RANK": "1.0"}, "OMPI_COMM_WORLD_NODE_RANK='1.0'"),
])
def test_inconsistent_values_name_the_variable(env, match):
    with pytest.raises(RankEnvError, match=match):
        from_env(env)
