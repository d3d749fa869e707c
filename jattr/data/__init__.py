"""Image datasets for diffusion training and attribution: loaders and subsetting.

``load_digits`` is embedded (scikit-learn); the other loaders read a data directory
given as ``data_dir`` or ``$JATTR_DATA``. Your own data comes in as a folder of
PNG/JPEG images (``load_image_folder``) or an ``.npz``/``.npy`` file
(``load_arrays``), and ``load_dataset`` takes a path to either in place of a name
(``dataset_source``). Every loader returns a ``Dataset`` with float32 images in
[-1, 1], shape [N, H, W, C], and int32 labels [N].
"""

from jattr.data.dataset import Dataset
from jattr.data.digits import load_digits
from jattr.data.files import DATA_ENV
from jattr.data.files import DATASET_NAMES
from jattr.data.files import dataset_source
from jattr.data.files import load_cifar2
from jattr.data.files import load_dataset
from jattr.data.files import load_fashion_mnist
from jattr.data.files import load_olivetti
from jattr.data.files import resolve_data_dir
from jattr.data.own import ImageFolder
from jattr.data.own import load_arrays
from jattr.data.own import load_image_folder
from jattr.data.own import scan_image_folder
from jattr.data.subsets import filter_classes
from jattr.data.subsets import first_n
from jattr.data.subsets import per_class
from jattr.data.subsets import random_subset
from jattr.data.subsets import resize
from jattr.data.subsets import split_indices
from jattr.data.subsets import take
