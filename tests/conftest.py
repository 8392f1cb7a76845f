import pytest

from tests.engine_fixtures import EngineLoop, start_engine, test_model_path


@pytest.fixture(scope="session")
def model_path():
    return test_model_path()


@pytest.fixture(scope="session")
def engine_loop():
    loop = EngineLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def engine(engine_loop, model_path):
    policy_engine = start_engine(engine_loop, model_path)
    yield policy_engine
    policy_engine.shutdown()
