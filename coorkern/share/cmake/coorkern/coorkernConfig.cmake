# CMake package of coorkern's C++ library (shipped inside the Python package).
#
#   cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)');$(python -c 'import coorkern; print(coorkern.cmake_prefix_path())')" ..
#   find_package(coorkern REQUIRED)            # also finds Torch
#   target_link_libraries(app PRIVATE coorkern::ops)
#
# coorkern::ops: libcoorkern_ops.so (op schemas, CPU kernels, and the ahead-of-time
# compiled CUDA kernels when it was built with them), the header <coorkern/ops.h>,
# and Torch's libraries and compile flags.
#
# The library registers the ops from static initializers, so it must be loaded even by a
# program that calls them only through the dispatcher by name and so references none of
# its symbols.  Linkers that drop such libraries (--as-needed, the default of Debian's and
# Ubuntu's GCC) would leave "Could not find schema for coorkern::..." at run time; the
# target therefore links it inside --push-state,--no-as-needed ... --pop-state (GNU ld,
# gold, lld and mold understand these), which keeps its DT_NEEDED entry and changes
# nothing for the other libraries.  docs/cpp.md has the details.
include(CMakeFindDependencyMacro)

get_filename_component(_coorkern_package_dir "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(_coorkern_library "${_coorkern_package_dir}/lib/libcoorkern_ops.so")

if(NOT EXISTS "${_coorkern_library}")
  set(coorkern_FOUND FALSE)
  set(coorkern_NOT_FOUND_MESSAGE
      "${_coorkern_library} does not exist: the C++ library was not built (reinstall coorkern with "
      "`pip install --no-build-isolation -e .` and read the build warnings)")
  return()
endif()

find_dependency(Torch)

if(NOT TARGET coorkern::ops)
  add_library(coorkern::ops SHARED IMPORTED)
  # On ELF platforms the library is named a second time, between the state flags: the
  # target's own entry (IMPORTED_LOCATION) gives CMake the rpath, this one the DT_NEEDED.
  if(APPLE OR WIN32)
    set(_coorkern_keep_loaded "")
  else()
    set(_coorkern_keep_loaded "-Wl,--push-state,--no-as-needed;${_coorkern_library};-Wl,--pop-state")
  endif()
  set_target_properties(coorkern::ops PROPERTIES
    IMPORTED_LOCATION "${_coorkern_library}"
    IMPORTED_SONAME "libcoorkern_ops.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_coorkern_package_dir}/include"
    INTERFACE_LINK_LIBRARIES "${_coorkern_keep_loaded};${TORCH_LIBRARIES}")
  unset(_coorkern_keep_loaded)
endif()

set(coorkern_INCLUDE_DIRS "${_coorkern_package_dir}/include")
set(coorkern_LIBRARIES coorkern::ops)
