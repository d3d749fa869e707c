"""Diffusion building blocks: schedules, losses, fixed draws, samplers."""

from jattr.diffusion.checks import check_finite_params
from jattr.diffusion.checks import check_image_range
from jattr.diffusion.checks import check_timesteps
from jattr.diffusion.draws import Draws
from jattr.diffusion.draws import fixed_draws
from jattr.diffusion.draws import uniform_timesteps
from jattr.diffusion.losses import batch_loss
from jattr.diffusion.losses import example_loss
from jattr.diffusion.losses import per_example_loss
from jattr.diffusion.losses import target
from jattr.diffusion.losses import to_eps_x0
from jattr.diffusion.samplers import Trajectory
from jattr.diffusion.samplers import ddim_sample
from jattr.diffusion.samplers import ddim_timesteps
from jattr.diffusion.samplers import ddpm_sample
from jattr.diffusion.schedules import Schedule
from jattr.diffusion.schedules import cosine
from jattr.diffusion.schedules import linear
from jattr.diffusion.schedules import q_sample
from jattr.diffusion.measurements import MEASUREMENTS
from jattr.diffusion.measurements import measurement_fn
from jattr.diffusion.measurements import trajectory_step_measurement
