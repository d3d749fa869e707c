"""Training: one denoiser (`train`) or many on subsets at once (`train_many`)."""

from jattr.train.checkpointer import Checkpointer
from jattr.train.checkpointer import check_same_job
from jattr.train.checkpointer import config_dict
from jattr.train.loop import DivergedError
from jattr.train.loop import check_data
from jattr.train.loop import draw_batch
from jattr.train.loop import make_segment_fn
from jattr.train.loop import make_step_fn
from jattr.train.loop import segments
from jattr.train.loop import train
from jattr.train.many import STRATEGIES
from jattr.train.many import ManyResult
from jattr.train.many import Subsets
from jattr.train.many import make_subsets
from jattr.train.many import map_members
from jattr.train.many import member_keys
from jattr.train.many import subsets_digest
from jattr.train.many import train_many
from jattr.train.state import TrainConfig
from jattr.train.state import TrainState
from jattr.train.state import ema_update
from jattr.train.state import init_state
from jattr.train.state import make_optimizer
